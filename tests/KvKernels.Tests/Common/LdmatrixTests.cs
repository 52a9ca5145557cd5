using KvKernels.Cuda;

namespace KvKernels.Tests.Common;

/// <summary>
/// kvk_mma.cuh's ldmatrix x1/x2/x4, plain and .trans, on 8×8 iota tiles (matrix i, row r, column c holds 64i + 8r + c)
/// whose 32 rows sit in a shuffled set of shared-memory slots (rows need not be contiguous), and movmatrix.trans of the
/// x4 registers, which must equal the .trans load. Expected registers come from the PTX ISA fragment description:
/// plain: lane L gets row L/4, columns 2(L%4), 2(L%4)+1; .trans: (row 2(L%4), col L/4) and (row 2(L%4)+1, col L/4).
/// </summary>
public sealed class LdmatrixTests(Backends backends)
{
    private static readonly (string Name, int Count, bool Trans)[] Variants =
    [
        ("x1", 1, false), ("x2", 2, false), ("x4", 4, false),
        ("x1.trans", 1, true), ("x2.trans", 2, true), ("x4.trans", 4, true),
        ("movmatrix.trans of x4", 4, true),
    ];

    private static ushort Element(int matrix, int row, int col) => (ushort)(64 * matrix + 8 * row + col);

    [Theory]
    [MemberData(nameof(Backends.Names), MemberType = typeof(Backends))]
    public void Ldmatrix_AndMovmatrix_DeliverTheIsaFragmentLayout(string backend)
    {
        var device = backends.Get(backend);
        var kernel = device.LoadModule(CommonKernels.Specialization).GetKernel("kvk_test_ldmatrix");
        var tile = new ushort[32 * 8];
        for (int m = 0; m < 4; m++)
            for (int r = 0; r < 8; r++)
                for (int c = 0; c < 8; c++) tile[(8 * m + r) * 8 + c] = Element(m, r, c);
        var slots = TestData.Permutation(new Random(5), 64)[..32];

        using var dTile = device.Allocate<ushort>(tile);
        using var dSlots = device.Allocate<int>(slots);
        using var dOut = device.Allocate<uint>(Variants.Length * 32 * 4);
        var args = new KernelArguments();
        args.Add(dTile.Span);
        args.Add(dSlots.Span);
        args.Add(dOut.Span);
        kernel.Launch(1, 32, 0, null, ref args);
        var output = dOut.ToArray();

        for (int v = 0; v < Variants.Length; v++)
        {
            var (name, count, trans) = Variants[v];
            for (int lane = 0; lane < 32; lane++)
            {
                int g = lane >> 2, t = lane & 3;
                for (int i = 0; i < 4; i++)
                {
                    uint expected = 0xDEADBEEFu;
                    if (i < count)
                    {
                        ushort lo = trans ? Element(i, 2 * t, g) : Element(i, g, 2 * t);
                        ushort hi = trans ? Element(i, 2 * t + 1, g) : Element(i, g, 2 * t + 1);
                        expected = lo | ((uint)hi << 16);
                    }
                    uint got = output[(v * 32 + lane) * 4 + i];
                    Assert.True(expected == got, $"{name}: lane {lane} register {i} = 0x{got:X8}, expected 0x{expected:X8}");
                }
            }
        }
    }
}
