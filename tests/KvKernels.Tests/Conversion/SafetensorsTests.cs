using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using KvKernels.Conversion;

namespace KvKernels.Tests.Conversion;

/// <summary>
/// The safetensors reader and writer: round trips of every dtype, a file whose bytes are written here by hand from the
/// format's specification (as another tool would lay it out), and files that break the specification.
/// </summary>
public sealed class SafetensorsTests
{
    /// <summary>
    /// A file built byte by byte from the specification, not by our writer: key order differs from data order, the
    /// metadata comes last, the header is padded with spaces, and the values have known bit patterns.
    /// </summary>
    private static byte[] HandWrittenFile()
    {
        const string header =
            "{\"b16\":{\"dtype\":\"BF16\",\"shape\":[1,3],\"data_offsets\":[8,14]}," +
            " \"f32\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}," +
            "\"half\":{\"dtype\":\"F16\",\"shape\":[2,1],\"data_offsets\":[14,18]}," +
            "\"ids\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[18,26]}," +
            "\"empty\":{\"dtype\":\"F32\",\"shape\":[0,4],\"data_offsets\":[26,26]}," +
            "\"__metadata__\":{\"format\":\"pt\",\"source\":\"by hand\"}}     ";
        byte[] json = Encoding.UTF8.GetBytes(header);
        var data = new byte[]
        {
            0x00, 0x00, 0xC0, 0x3F, 0x00, 0x00, 0x00, 0xC0,                 // f32: 1.5, -2.0
            0x80, 0x3F, 0x00, 0xBF, 0x40, 0x40,                             // b16: 1.0, -0.5, 3.0
            0x00, 0x38, 0xFF, 0x7B,                                         // half: 0.5, 65504
            0x2A, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,                 // ids: 42 + 2^56
        };
        var file = new byte[8 + json.Length + data.Length];
        BinaryPrimitives.WriteUInt64LittleEndian(file, (ulong)json.Length);
        json.CopyTo(file, 8);
        data.CopyTo(file, 8 + json.Length);
        return file;
    }

    [Fact]
    public void A_hand_written_file_reads_as_the_specification_says()
    {
        using var dir = new TempDirectory();
        File.WriteAllBytes(dir["hand.safetensors"], HandWrittenFile());
        using var file = SafetensorsFile.Open(dir["hand.safetensors"]);

        Assert.Equal(["f32", "b16", "half", "ids", "empty"], file.Tensors.Select(t => t.Name)); // data order, not key order
        Assert.Equal("pt", file.Metadata["format"]);
        Assert.Equal("by hand", file.Metadata["source"]);
        Assert.Equal([1.5f, -2f], file.ReadSingles(file.Get("f32")));
        Assert.Equal([1f, -0.5f, 3f], file.ReadSingles(file.Get("b16")));
        Assert.Equal([1L, 3L], file.Get("b16").Shape);
        Assert.Equal([0.5f, 65504f], file.ReadSingles(file.Get("half")));
        Assert.Empty(file.Get("ids").Shape);
        Assert.Equal(42L + (1L << 56), BinaryPrimitives.ReadInt64LittleEndian(file.GetBytes(file.Get("ids"))));
        Assert.Equal(0, file.Get("empty").ElementCount);
        Assert.Equal([0L, 4L], file.Get("empty").Shape);
        Assert.Throws<CheckpointException>(() => file.ReadSingles(file.Get("ids")));
    }

    [Fact]
    public void A_hand_written_file_round_trips_through_the_writer()
    {
        using var dir = new TempDirectory();
        File.WriteAllBytes(dir["hand.safetensors"], HandWrittenFile());
        using (var source = SafetensorsFile.Open(dir["hand.safetensors"]))
        {
            using var writer = SafetensorsWriter.Create(dir["copy.safetensors"], source.Tensors.Select(t => t.Declaration).ToList(), source.Metadata);
            foreach (var t in source.Tensors) source.CopyTo(t, writer);
            writer.Complete();
        }
        using var original = SafetensorsFile.Open(dir["hand.safetensors"]);
        using var copy = SafetensorsFile.Open(dir["copy.safetensors"]);
        Assert.Equal(original.Tensors.Select(t => (t.Name, t.DType, Shape: string.Join(",", t.Shape))), copy.Tensors.Select(t => (t.Name, t.DType, Shape: string.Join(",", t.Shape))));
        foreach (var t in original.Tensors) Assert.Equal(original.GetBytes(t).ToArray(), copy.GetBytes(copy.Get(t.Name)).ToArray());
        Assert.Equal(original.Metadata.OrderBy(kv => kv.Key), copy.Metadata.OrderBy(kv => kv.Key));
    }

    [Fact]
    public void The_writer_lays_out_the_header_as_the_specification_says()
    {
        using var dir = new TempDirectory();
        ConversionFixtures.WriteFile(dir["w.safetensors"],
        [
            new("a", SafetensorsDType.F32, [3], [1, 2, 3]),
            new("b", SafetensorsDType.BF16, [1], [0.5f]),
        ], new Dictionary<string, string> { ["format"] = "pt" });
        byte[] bytes = File.ReadAllBytes(dir["w.safetensors"]);
        ulong n = BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        Assert.Equal(0ul, (8 + n) % 8); // data aligned to 8 bytes
        Assert.Equal((byte)'{', bytes[8]);
        using var json = JsonDocument.Parse(bytes.AsMemory(8, (int)n));
        var root = json.RootElement;
        Assert.Equal("pt", root.GetProperty("__metadata__").GetProperty("format").GetString());
        Assert.Equal("F32", root.GetProperty("a").GetProperty("dtype").GetString());
        Assert.Equal([0L, 12L], root.GetProperty("a").GetProperty("data_offsets").EnumerateArray().Select(e => e.GetInt64()));
        Assert.Equal([12L, 14L], root.GetProperty("b").GetProperty("data_offsets").EnumerateArray().Select(e => e.GetInt64()));
        Assert.Equal(8 + (long)n + 14, bytes.Length);
        Assert.Equal([0x00, 0x3F], bytes[^2..]); // bf16 0.5 = 0x3F00, little-endian
    }

    [Theory]
    [InlineData(SafetensorsDType.F32)]
    [InlineData(SafetensorsDType.F16)]
    [InlineData(SafetensorsDType.BF16)]
    [InlineData(SafetensorsDType.F64)]
    public void Float_tensors_round_trip_with_round_to_nearest_even(SafetensorsDType dtype)
    {
        using var dir = new TempDirectory();
        var random = new Random(7);
        // Special values first, so that the vectorised conversions meet them, then random ones and a scalar tail.
        float[] values =
        [
            1f / 3, 65519f, -0f, float.PositiveInfinity, 1e-8f, float.NaN, -float.NaN, float.NegativeInfinity,
            BitConverter.UInt32BitsToSingle(0x3F808000), BitConverter.UInt32BitsToSingle(0x3F818000), // bf16 ties: to even
            BitConverter.UInt32BitsToSingle(0x7F7FFFFF), float.Epsilon,
            .. ConversionFixtures.RandomArray(random, 37, 3f),
        ];
        ConversionFixtures.WriteFile(dir["x.safetensors"], [new("x", dtype, [values.Length], values)]);
        using var file = SafetensorsFile.Open(dir["x.safetensors"]);
        var read = file.ReadSingles(file.Get("x"));
        for (int i = 0; i < values.Length; i++)
        {
            if (float.IsNaN(values[i]))
            {
                Assert.True(float.IsNaN(read[i]), $"element {i}: NaN became {read[i]}");
                continue;
            }
            float expected = dtype switch
            {
                SafetensorsDType.F16 => (float)(Half)values[i],          // .NET's conversion rounds to nearest even
                SafetensorsDType.BF16 => BFloat16RoundNearestEven(values[i]),
                _ => values[i],
            };
            Assert.True(BitConverter.SingleToInt32Bits(expected) == BitConverter.SingleToInt32Bits(read[i]), $"element {i}: {values[i]} → {read[i]}, expected {expected}");
        }
        // Partial reads at an offset that is not a multiple of the vector width.
        var part = new float[29];
        file.ReadSingles(file.Get("x"), 5, part);
        Assert.Equal(read.AsSpan(5, 29).ToArray(), part);
    }

    // Written out from the definition (not through the library's BFloat16) so that the test can disagree with it.
    private static float BFloat16RoundNearestEven(float value)
    {
        uint u = BitConverter.SingleToUInt32Bits(value);
        uint lower = u & 0xFFFF, upper = u >> 16;
        if (lower > 0x8000 || (lower == 0x8000 && (upper & 1) == 1)) upper++;
        return BitConverter.UInt32BitsToSingle(upper << 16);
    }

    [Fact]
    public void Raw_tensors_of_every_dtype_round_trip()
    {
        using var dir = new TempDirectory();
        var random = new Random(3);
        var declarations = new List<TensorDeclaration>();
        var payloads = new List<byte[]>();
        foreach (var dtype in Enum.GetValues<SafetensorsDType>())
        {
            long[] shape = [2, 3];
            declarations.Add(new TensorDeclaration("t." + dtype.Name(), dtype, shape));
            var bytes = new byte[6 * dtype.Size()];
            random.NextBytes(bytes);
            payloads.Add(bytes);
        }
        declarations.Add(new TensorDeclaration("scalar", SafetensorsDType.I32, []));
        payloads.Add(BitConverter.GetBytes(-7));
        declarations.Add(new TensorDeclaration("empty", SafetensorsDType.F16, [4, 0]));
        payloads.Add([]);
        using (var writer = SafetensorsWriter.Create(dir["all.safetensors"], declarations))
        {
            for (int i = 0; i < declarations.Count; i++)
            {
                // In two pieces, as a streaming producer would write them.
                var p = payloads[i];
                writer.Write(declarations[i].Name, p.AsSpan(0, p.Length / 2));
                writer.Write(declarations[i].Name, p.AsSpan(p.Length / 2));
            }
            writer.Complete();
        }
        using var file = SafetensorsFile.Open(dir["all.safetensors"]);
        Assert.Equal(declarations.Select(d => d.Name), file.Tensors.Select(t => t.Name).OrderBy(n => declarations.FindIndex(d => d.Name == n)));
        for (int i = 0; i < declarations.Count; i++)
        {
            var t = file.Get(declarations[i].Name);
            Assert.Equal(declarations[i].DType, t.DType);
            Assert.Equal(declarations[i].Shape, t.Shape);
            Assert.Equal(payloads[i], file.GetBytes(t).ToArray());
        }
        Assert.Empty(file.Metadata);
    }

    [Fact]
    public void The_writer_refuses_out_of_order_or_incomplete_tensors_and_leaves_no_file()
    {
        using var dir = new TempDirectory();
        var declarations = new List<TensorDeclaration> { new("a", SafetensorsDType.F32, [2]), new("b", SafetensorsDType.F32, [2]) };
        using (var writer = SafetensorsWriter.Create(dir["x.safetensors"], declarations))
        {
            Assert.Throws<InvalidOperationException>(() => writer.WriteTensor("b", [1f, 2f]));
            Assert.Throws<InvalidOperationException>(() => writer.WriteTensor("a", [1f, 2f, 3f]));
            writer.WriteTensor("a", [1f, 2f]);
            var e = Assert.Throws<InvalidOperationException>(writer.Complete);
            Assert.Contains("'b'", e.Message);
        }
        Assert.Empty(dir.Entries());
        Assert.Throws<ArgumentException>(() => SafetensorsWriter.Create(dir["y.safetensors"], [new("a", SafetensorsDType.F32, [1]), new("a", SafetensorsDType.F32, [1])]));
        Assert.Throws<ArgumentException>(() => SafetensorsWriter.Create(dir["y.safetensors"], [new("__metadata__", SafetensorsDType.F32, [1])]));
        Assert.Empty(dir.Entries());
    }

    [Fact]
    public void An_existing_file_is_not_replaced_unless_asked()
    {
        using var dir = new TempDirectory();
        File.WriteAllText(dir["x.safetensors"], "keep");
        Assert.Throws<IOException>(() => SafetensorsWriter.Create(dir["x.safetensors"], [new("a", SafetensorsDType.F32, [1])]));
        Assert.Equal("keep", File.ReadAllText(dir["x.safetensors"]));
        using (var writer = SafetensorsWriter.Create(dir["x.safetensors"], [new("a", SafetensorsDType.F32, [1])], overwrite: true))
        {
            Assert.Equal("keep", File.ReadAllText(dir["x.safetensors"])); // untouched until Complete
            writer.WriteTensor("a", [4f]);
            writer.Complete();
        }
        using var file = SafetensorsFile.Open(dir["x.safetensors"]);
        Assert.Equal([4f], file.ReadSingles(file.Get("a")));
        Assert.Single(dir.Entries());
    }

    public static TheoryData<string, string, string> BadHeaders => new()
    {
        { "hole", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", "'b'" },
        { "overlap", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", "'b'" },
        { "size", "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", "'a'" },
        { "dtype", "{\"a\":{\"dtype\":\"F17\",\"shape\":[2],\"data_offsets\":[0,8]}}", "'a'" },
        { "duplicate", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", "'a'" },
        { "negative dim", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", "'a'" },
        { "metadata value", "{\"__metadata__\":{\"n\":3},\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", "'n'" },
        { "not json", "{\"a\":", "JSON" },
        { "not an object", "[1, 2]", "'{'" },
        { "short data", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", "truncated" },
    };

    [Theory]
    [MemberData(nameof(BadHeaders))]
    public void A_file_that_breaks_the_specification_is_rejected_with_the_reason(string what, string header, string named)
    {
        using var dir = new TempDirectory();
        byte[] json = Encoding.UTF8.GetBytes(header);
        var file = new byte[8 + json.Length + 8];
        BinaryPrimitives.WriteUInt64LittleEndian(file, (ulong)json.Length);
        json.CopyTo(file, 8);
        File.WriteAllBytes(dir["bad.safetensors"], file);
        var e = Assert.Throws<InvalidDataException>(() => SafetensorsFile.Open(dir["bad.safetensors"]));
        Assert.Contains("bad.safetensors", e.Message);
        Assert.Contains(named, e.Message);
        _ = what;
    }

    [Fact]
    public void Truncated_and_oversized_headers_are_rejected()
    {
        using var dir = new TempDirectory();
        File.WriteAllBytes(dir["short.safetensors"], [1, 2, 3]);
        Assert.Throws<InvalidDataException>(() => SafetensorsFile.Open(dir["short.safetensors"]));
        var file = new byte[16];
        BinaryPrimitives.WriteUInt64LittleEndian(file, 1000);
        File.WriteAllBytes(dir["long.safetensors"], file);
        var e = Assert.Throws<InvalidDataException>(() => SafetensorsFile.Open(dir["long.safetensors"]));
        Assert.Contains("1000", e.Message);
        Assert.Throws<FileNotFoundException>(() => SafetensorsFile.Open(dir["missing.safetensors"]));
    }
}
