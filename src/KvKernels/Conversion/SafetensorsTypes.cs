using System.Collections.ObjectModel;

namespace KvKernels.Conversion;

/// <summary>Element types of the safetensors format, with the format's own names (<c>"F16"</c>, <c>"BF16"</c> …).</summary>
public enum SafetensorsDType
{
    /// <summary><c>BOOL</c>: one byte per element.</summary>
    Bool,

    /// <summary><c>U8</c>.</summary>
    U8,

    /// <summary><c>I8</c>.</summary>
    I8,

    /// <summary><c>F8_E5M2</c>.</summary>
    F8E5M2,

    /// <summary><c>F8_E4M3</c>.</summary>
    F8E4M3,

    /// <summary><c>I16</c>.</summary>
    I16,

    /// <summary><c>U16</c>.</summary>
    U16,

    /// <summary><c>F16</c>: IEEE binary16.</summary>
    F16,

    /// <summary><c>BF16</c>: bfloat16.</summary>
    BF16,

    /// <summary><c>I32</c>.</summary>
    I32,

    /// <summary><c>U32</c>.</summary>
    U32,

    /// <summary><c>F32</c>: IEEE binary32.</summary>
    F32,

    /// <summary><c>F64</c>: IEEE binary64.</summary>
    F64,

    /// <summary><c>I64</c>.</summary>
    I64,

    /// <summary><c>U64</c>.</summary>
    U64,
}

/// <summary>Names and sizes of <see cref="SafetensorsDType"/>.</summary>
public static class SafetensorsDTypes
{
    private static readonly string[] Names =
        ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"];

    /// <summary>Bytes per element.</summary>
    public static int Size(this SafetensorsDType type) => type switch
    {
        SafetensorsDType.Bool or SafetensorsDType.U8 or SafetensorsDType.I8 or SafetensorsDType.F8E5M2 or SafetensorsDType.F8E4M3 => 1,
        SafetensorsDType.I16 or SafetensorsDType.U16 or SafetensorsDType.F16 or SafetensorsDType.BF16 => 2,
        SafetensorsDType.I32 or SafetensorsDType.U32 or SafetensorsDType.F32 => 4,
        SafetensorsDType.F64 or SafetensorsDType.I64 or SafetensorsDType.U64 => 8,
        _ => throw new ArgumentOutOfRangeException(nameof(type), type, "Not a safetensors element type."),
    };

    /// <summary>The format's name of the type (<c>"BF16"</c>).</summary>
    public static string Name(this SafetensorsDType type) =>
        (uint)type < (uint)Names.Length ? Names[(int)type] : throw new ArgumentOutOfRangeException(nameof(type), type, "Not a safetensors element type.");

    /// <summary>Parses a format name; false for an unknown one.</summary>
    public static bool TryParse(string name, out SafetensorsDType type)
    {
        int index = Array.IndexOf(Names, name);
        type = (SafetensorsDType)Math.Max(index, 0);
        return index >= 0;
    }

    /// <summary>Whether the type is fp16, bf16, fp32 or fp64: the types the converters read and write as numbers.</summary>
    public static bool IsFloat(this SafetensorsDType type) =>
        type is SafetensorsDType.F16 or SafetensorsDType.BF16 or SafetensorsDType.F32 or SafetensorsDType.F64;
}

/// <summary>A tensor to be written: name, element type and shape (row-major, the last dimension contiguous).</summary>
/// <param name="Name">Unique tensor name.</param>
/// <param name="DType">Element type.</param>
/// <param name="Shape">Dimensions, each ≥ 0; empty for a scalar.</param>
public sealed record TensorDeclaration(string Name, SafetensorsDType DType, IReadOnlyList<long> Shape)
{
    /// <summary>Number of elements (1 for a scalar).</summary>
    public long ElementCount => SafetensorsHeader.Elements(Shape);

    /// <summary>Bytes of the tensor's data.</summary>
    public long ByteLength => checked(ElementCount * DType.Size());

    /// <summary>The shape as text, <c>[4096, 4096]</c>.</summary>
    public string ShapeText => SafetensorsHeader.ShapeText(Shape);
}

/// <summary>A tensor of a safetensors file: its declaration and where its bytes lie.</summary>
/// <param name="Name">Tensor name.</param>
/// <param name="DType">Element type.</param>
/// <param name="Shape">Dimensions (row-major).</param>
/// <param name="Begin">Start of the data, in bytes from the start of the data buffer (after the header).</param>
/// <param name="End">End of the data (exclusive), same origin.</param>
public sealed record SafetensorsTensor(string Name, SafetensorsDType DType, IReadOnlyList<long> Shape, long Begin, long End)
{
    /// <summary>Number of elements (1 for a scalar).</summary>
    public long ElementCount => SafetensorsHeader.Elements(Shape);

    /// <summary>Bytes of the tensor's data.</summary>
    public long ByteLength => End - Begin;

    /// <summary>The shape as text, <c>[4096, 4096]</c>.</summary>
    public string ShapeText => SafetensorsHeader.ShapeText(Shape);

    /// <summary>The same tensor as a declaration for a writer.</summary>
    public TensorDeclaration Declaration => new(Name, DType, Shape);

    /// <summary>Whether the shape equals <paramref name="shape"/>.</summary>
    public bool HasShape(params long[] shape) => Shape.SequenceEqual(shape);
}

/// <summary>The <c>__metadata__</c> of a file: a string → string map (may be empty).</summary>
public sealed class SafetensorsMetadata : ReadOnlyDictionary<string, string>
{
    /// <summary>Wraps <paramref name="entries"/> (copied).</summary>
    public SafetensorsMetadata(IDictionary<string, string> entries) : base(new Dictionary<string, string>(entries, StringComparer.Ordinal))
    {
    }

    /// <summary>No metadata.</summary>
    public static new SafetensorsMetadata Empty { get; } = new(new Dictionary<string, string>());
}
