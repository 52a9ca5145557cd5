using System.Runtime.InteropServices;

namespace KvKernels.Conversion;

/// <summary>
/// Writes a safetensors file as a stream: the header is written first from the declared tensors (so every shape is
/// known up front), then each tensor's bytes in declaration order, in as many pieces as the caller likes. Nothing is
/// held in memory but a small conversion buffer, so a checkpoint of any size streams through.
/// <see cref="Create(string, IReadOnlyList{TensorDeclaration}, IReadOnlyDictionary{string, string}?, bool)"/> writes a
/// <see cref="StagedFile"/>: the file appears under its name only when <see cref="Complete"/> succeeds.
/// </summary>
public sealed class SafetensorsWriter : IDisposable
{
    private readonly Stream _stream;
    private readonly bool _leaveOpen;
    private readonly StagedFile? _staged;
    private readonly byte[] _scratch = new byte[1 << 16];
    private int _current;        // index of the tensor being written
    private long _writtenInCurrent;
    private readonly Dictionary<string, int> _index = new(StringComparer.Ordinal);
    private bool _disposed;

    /// <summary>Writes the header of <paramref name="tensors"/> to <paramref name="stream"/>.</summary>
    /// <param name="stream">A writable stream positioned at the start of the file.</param>
    /// <param name="tensors">Every tensor of the file, in the order their data will be written.</param>
    /// <param name="metadata">The <c>__metadata__</c> map (string → string), or null.</param>
    /// <param name="leaveOpen">Leave <paramref name="stream"/> open on dispose.</param>
    /// <exception cref="ArgumentException">Duplicate or empty names, a name <c>__metadata__</c>, a negative dimension.</exception>
    public SafetensorsWriter(Stream stream, IReadOnlyList<TensorDeclaration> tensors, IReadOnlyDictionary<string, string>? metadata = null,
        bool leaveOpen = false)
        : this(stream, tensors, metadata, leaveOpen, staged: null)
    {
    }

    private SafetensorsWriter(Stream stream, IReadOnlyList<TensorDeclaration> tensors, IReadOnlyDictionary<string, string>? metadata,
        bool leaveOpen, StagedFile? staged)
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentNullException.ThrowIfNull(tensors);
        if (!BitConverter.IsLittleEndian) throw new PlatformNotSupportedException("safetensors data is little-endian; this host is not.");
        foreach (var t in tensors)
        {
            if (string.IsNullOrEmpty(t.Name) || t.Name == SafetensorsHeader.MetadataKey)
                throw new ArgumentException($"'{t.Name}' cannot name a tensor.", nameof(tensors));
            if (!_index.TryAdd(t.Name, _index.Count)) throw new ArgumentException($"tensor '{t.Name}' is declared twice.", nameof(tensors));
            if (t.Shape.Any(d => d < 0)) throw new ArgumentException($"tensor '{t.Name}' has a negative dimension in {t.ShapeText}.", nameof(tensors));
            if (!Enum.IsDefined(t.DType)) throw new ArgumentException($"tensor '{t.Name}' has an unknown dtype {t.DType}.", nameof(tensors));
        }
        _stream = stream;
        _leaveOpen = leaveOpen;
        _staged = staged;
        Tensors = tensors;
        var header = SafetensorsHeader.Format(tensors, metadata);
        DataStart = header.Length;
        TotalBytes = header.Length + tensors.Sum(t => t.ByteLength);
        _stream.Write(header);
        SkipEmpty();
    }

    /// <summary>
    /// Creates a staged file at <paramref name="path"/> and writes the header; <see cref="Complete"/> moves the file into
    /// place, <see cref="Dispose"/> without it deletes the partial file.
    /// </summary>
    public static SafetensorsWriter Create(string path, IReadOnlyList<TensorDeclaration> tensors, IReadOnlyDictionary<string, string>? metadata = null,
        bool overwrite = false)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        long size = SafetensorsHeader.Format(tensors, metadata).Length + tensors.Sum(t => t.ByteLength);
        var staged = StagedFile.Create(path, overwrite, size);
        try
        {
            return new SafetensorsWriter(staged.Stream, tensors, metadata, leaveOpen: true, staged);
        }
        catch
        {
            staged.Dispose();
            throw;
        }
    }

    /// <summary>The declared tensors, in file order.</summary>
    public IReadOnlyList<TensorDeclaration> Tensors { get; }

    /// <summary>Bytes of the header (with its length prefix): where the data starts.</summary>
    public long DataStart { get; }

    /// <summary>Bytes of the complete file.</summary>
    public long TotalBytes { get; }

    /// <summary>The tensor expected next, or null when all are written.</summary>
    public TensorDeclaration? Next => _current < Tensors.Count ? Tensors[_current] : null;

    /// <summary>Appends raw little-endian bytes to tensor <paramref name="name"/>, which must be the one being written
    /// (<see cref="Next"/>); once its bytes are complete the writer moves on to the next tensor.</summary>
    /// <exception cref="InvalidOperationException">Another tensor is due, or the bytes overrun the tensor.</exception>
    public void Write(string name, ReadOnlySpan<byte> bytes)
    {
        if (IsSkippedEmpty(name, bytes.Length)) return;
        var tensor = Expect(name);
        if (bytes.Length > tensor.ByteLength - _writtenInCurrent)
            throw new InvalidOperationException($"tensor '{name}' is {tensor.ByteLength} bytes; {_writtenInCurrent + bytes.Length} were written.");
        _stream.Write(bytes);
        _writtenInCurrent += bytes.Length;
        if (_writtenInCurrent == tensor.ByteLength) Advance();
    }

    /// <summary>Appends fp32 values to tensor <paramref name="name"/>, rounded (to nearest even) to its dtype, which
    /// must be F16, BF16, F32 or F64.</summary>
    public void WriteSingles(string name, ReadOnlySpan<float> values)
    {
        if (IsSkippedEmpty(name, values.Length)) return;
        var tensor = Expect(name);
        if (!tensor.DType.IsFloat()) throw new InvalidOperationException($"tensor '{name}' is {tensor.DType.Name()}; only float tensors take fp32 values.");
        int size = tensor.DType.Size();
        if ((long)values.Length * size > tensor.ByteLength - _writtenInCurrent)
            throw new InvalidOperationException($"tensor '{name}' has {tensor.ElementCount} elements; {_writtenInCurrent / size + values.Length} were written.");
        int chunk = _scratch.Length / size;
        for (int i = 0; i < values.Length; i += chunk)
        {
            int n = Math.Min(chunk, values.Length - i);
            var bytes = _scratch.AsSpan(0, n * size);
            ElementConversion.FromSingle(values.Slice(i, n), tensor.DType, bytes);
            Write(name, bytes);
        }
    }

    /// <summary>Writes a whole tensor of fp32 values (see <see cref="WriteSingles"/>).</summary>
    public void WriteTensor(string name, ReadOnlySpan<float> values)
    {
        if (IsSkippedEmpty(name, values.Length)) return;
        var tensor = Expect(name);
        if (_writtenInCurrent != 0 || values.Length != tensor.ElementCount)
            throw new InvalidOperationException($"tensor '{name}' has {tensor.ElementCount} elements; {values.Length} were given.");
        WriteSingles(name, values);
    }

    /// <summary>Writes a whole tensor of raw elements of its dtype.</summary>
    public void WriteTensor<T>(string name, ReadOnlySpan<T> values) where T : unmanaged => Write(name, MemoryMarshal.AsBytes(values));

    /// <summary>Checks that every tensor was written, flushes, and (for a staged file) moves it into place.</summary>
    /// <exception cref="InvalidOperationException">A tensor is incomplete.</exception>
    public void Complete()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_current < Tensors.Count)
            throw new InvalidOperationException($"tensor '{Tensors[_current].Name}' was not written completely ({_writtenInCurrent} of {Tensors[_current].ByteLength} bytes); " +
                $"{Tensors.Count - _current} tensor(s) remain.");
        if (_staged is not null) _staged.Commit();
        else _stream.Flush();
    }

    /// <summary>Closes the stream (unless left open); a staged file not completed is deleted.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        if (_staged is not null) _staged.Dispose();
        else if (!_leaveOpen) _stream.Dispose();
    }

    private TensorDeclaration Expect(string name)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_current >= Tensors.Count) throw new InvalidOperationException($"all tensors are written; '{name}' is not expected.");
        var tensor = Tensors[_current];
        if (!string.Equals(tensor.Name, name, StringComparison.Ordinal))
            throw new InvalidOperationException($"tensor '{tensor.Name}' is due next (declaration order); got '{name}'.");
        return tensor;
    }

    // An empty tensor has no bytes and is written by declaring it; a call naming it with no data is accepted.
    private bool IsSkippedEmpty(string name, int length) =>
        length == 0 && _index.TryGetValue(name, out int i) && i < _current && Tensors[i].ByteLength == 0;

    private void Advance()
    {
        _current++;
        _writtenInCurrent = 0;
        SkipEmpty();
    }

    private void SkipEmpty()
    {
        while (_current < Tensors.Count && Tensors[_current].ByteLength == 0) _current++;
    }
}
