using System.Buffers;
using System.Buffers.Binary;
using System.Globalization;
using System.Text.Json;

namespace KvKernels.Conversion;

/// <summary>
/// The safetensors header, from the format's specification: an 8-byte little-endian length N, then N bytes of UTF-8
/// JSON that start with <c>{</c> and may end in spaces; every key but <c>__metadata__</c> is a tensor
/// <c>{"dtype", "shape", "data_offsets": [begin, end]}</c> with offsets relative to the data buffer that follows. Keys are
/// unique, the byte buffer is entirely indexed without holes or overlaps, and a tensor's bytes are its elements times
/// the element size. Readers here hold files to all of that, so a file that another tool would reject is rejected.
/// </summary>
internal static class SafetensorsHeader
{
    /// <summary>The largest header accepted, as in the reference implementation (100 MB).</summary>
    public const long MaxHeaderBytes = 100_000_000;

    public const string MetadataKey = "__metadata__";

    public static long Elements(IReadOnlyList<long> shape)
    {
        long count = 1;
        foreach (long d in shape) count = checked(count * d);
        return count;
    }

    public static string ShapeText(IReadOnlyList<long> shape) => "[" + string.Join(", ", shape.Select(d => d.ToString(CultureInfo.InvariantCulture))) + "]";

    /// <summary>Parses and checks a header against a data buffer of <paramref name="dataLength"/> bytes. Tensors come back
    /// in file order (by offset).</summary>
    /// <exception cref="InvalidDataException">Names the file, the tensor and what is wrong.</exception>
    public static (List<SafetensorsTensor> Tensors, SafetensorsMetadata Metadata) Parse(ReadOnlySpan<byte> json, long dataLength, string source)
    {
        if (json.Length == 0 || json[0] != (byte)'{')
            throw Bad(source, "the header does not start with '{'");
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(json.ToArray(), new JsonDocumentOptions { MaxDepth = 8 });
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{source}: the header is not valid JSON ({e.Message}).", e);
        }

        var tensors = new List<SafetensorsTensor>();
        var metadata = SafetensorsMetadata.Empty;
        using (document)
        {
            if (document.RootElement.ValueKind != JsonValueKind.Object) throw Bad(source, "the header is not a JSON object");
            var seen = new HashSet<string>(StringComparer.Ordinal);
            foreach (var property in document.RootElement.EnumerateObject())
            {
                if (!seen.Add(property.Name)) throw Bad(source, $"the key '{property.Name}' appears twice");
                if (property.Name == MetadataKey)
                {
                    metadata = ParseMetadata(property.Value, source);
                    continue;
                }
                tensors.Add(ParseTensor(property.Name, property.Value, source));
            }
        }

        // The data buffer must be covered exactly: sorted by offset, each tensor starts where the previous one ended.
        tensors.Sort((a, b) => a.Begin != b.Begin ? a.Begin.CompareTo(b.Begin) : a.End.CompareTo(b.End));
        long position = 0;
        foreach (var t in tensors)
        {
            if (t.Begin != position)
                throw Bad(source, t.Begin > position
                    ? $"tensor '{t.Name}' starts at byte {t.Begin} of the data but the previous tensor ends at {position} (a hole)"
                    : $"tensor '{t.Name}' starts at byte {t.Begin} of the data, inside the previous tensor (which ends at {position})");
            position = t.End;
        }
        if (position != dataLength)
            throw Bad(source, position > dataLength
                ? $"the tensors need {position} bytes of data but the file holds {dataLength} after the header (truncated?)"
                : $"the tensors cover {position} bytes of data but the file holds {dataLength} after the header (trailing bytes)");
        return (tensors, metadata);
    }

    private static SafetensorsMetadata ParseMetadata(JsonElement value, string source)
    {
        if (value.ValueKind != JsonValueKind.Object) throw Bad(source, "__metadata__ is not an object of strings");
        var entries = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var entry in value.EnumerateObject())
        {
            if (entry.Value.ValueKind != JsonValueKind.String) throw Bad(source, $"__metadata__ entry '{entry.Name}' is not a string");
            if (!entries.TryAdd(entry.Name, entry.Value.GetString()!)) throw Bad(source, $"__metadata__ key '{entry.Name}' appears twice");
        }
        return new SafetensorsMetadata(entries);
    }

    private static SafetensorsTensor ParseTensor(string name, JsonElement value, string source)
    {
        if (value.ValueKind != JsonValueKind.Object) throw Bad(source, $"tensor '{name}' is not an object");
        string? dtypeName = null;
        long[]? shape = null, offsets = null;
        foreach (var field in value.EnumerateObject())
        {
            switch (field.Name)
            {
                case "dtype":
                    if (field.Value.ValueKind != JsonValueKind.String) throw Bad(source, $"tensor '{name}': dtype is not a string");
                    dtypeName = field.Value.GetString();
                    break;
                case "shape":
                    shape = Integers(field.Value, name, "shape", source);
                    break;
                case "data_offsets":
                    offsets = Integers(field.Value, name, "data_offsets", source);
                    break;
                default:
                    break; // other fields are ignored, as the reference reader does
            }
        }
        if (dtypeName is null || shape is null || offsets is null)
            throw Bad(source, $"tensor '{name}' lacks {(dtypeName is null ? "dtype" : shape is null ? "shape" : "data_offsets")}");
        if (!SafetensorsDTypes.TryParse(dtypeName, out var dtype)) throw Bad(source, $"tensor '{name}' has an unknown dtype '{dtypeName}'");
        if (offsets.Length != 2 || offsets[1] < offsets[0])
            throw Bad(source, $"tensor '{name}': data_offsets must be [begin, end] with begin ≤ end");
        long bytes;
        try
        {
            bytes = checked(Elements(shape) * dtype.Size());
        }
        catch (OverflowException)
        {
            throw Bad(source, $"tensor '{name}': shape {ShapeText(shape)} overflows");
        }
        if (offsets[1] - offsets[0] != bytes)
            throw Bad(source, $"tensor '{name}': {dtypeName} {ShapeText(shape)} is {bytes} bytes but data_offsets [{offsets[0]}, {offsets[1]}] span {offsets[1] - offsets[0]}");
        return new SafetensorsTensor(name, dtype, shape, offsets[0], offsets[1]);
    }

    private static long[] Integers(JsonElement value, string tensor, string field, string source)
    {
        if (value.ValueKind != JsonValueKind.Array) throw Bad(source, $"tensor '{tensor}': {field} is not an array");
        var result = new long[value.GetArrayLength()];
        int i = 0;
        foreach (var item in value.EnumerateArray())
        {
            if (item.ValueKind != JsonValueKind.Number || !item.TryGetInt64(out long n) || n < 0)
                throw Bad(source, $"tensor '{tensor}': {field}[{i}] is not a non-negative integer");
            result[i++] = n;
        }
        return result;
    }

    private static InvalidDataException Bad(string source, string what) => new($"{source}: not a valid safetensors file: {what}.");

    /// <summary>
    /// Builds the 8-byte length and the JSON header for <paramref name="tensors"/> laid out back to back in the given
    /// order, padded with spaces so that the data starts at a multiple of 8 bytes (as the reference writer does).
    /// </summary>
    public static byte[] Format(IReadOnlyList<TensorDeclaration> tensors, IReadOnlyDictionary<string, string>? metadata)
    {
        var buffer = new ArrayBufferWriter<byte>();
        using (var json = new Utf8JsonWriter(buffer))
        {
            json.WriteStartObject();
            if (metadata is { Count: > 0 })
            {
                json.WriteStartObject(MetadataKey);
                foreach (var (key, value) in metadata) json.WriteString(key, value);
                json.WriteEndObject();
            }
            long offset = 0;
            foreach (var t in tensors)
            {
                json.WriteStartObject(t.Name);
                json.WriteString("dtype", t.DType.Name());
                json.WriteStartArray("shape");
                foreach (long d in t.Shape) json.WriteNumberValue(d);
                json.WriteEndArray();
                json.WriteStartArray("data_offsets");
                json.WriteNumberValue(offset);
                offset = checked(offset + t.ByteLength);
                json.WriteNumberValue(offset);
                json.WriteEndArray();
                json.WriteEndObject();
            }
            json.WriteEndObject();
        }
        int length = buffer.WrittenCount;
        int padded = (length + 7) / 8 * 8;
        var result = new byte[8 + padded];
        BinaryPrimitives.WriteUInt64LittleEndian(result, (ulong)padded);
        buffer.WrittenSpan.CopyTo(result.AsSpan(8));
        result.AsSpan(8 + length).Fill((byte)' ');
        return result;
    }
}
