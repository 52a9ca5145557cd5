using System.Buffers;
using System.Buffers.Binary;
using System.IO.MemoryMappedFiles;
using System.Runtime.InteropServices;

namespace KvKernels.Conversion;

/// <summary>
/// A safetensors file opened for reading through a read-only memory map: opening reads and checks only the header;
/// tensor bytes are paged in by the OS when a span over them is read, so a checkpoint larger than memory can be
/// converted tensor by tensor. Spans returned by this class stay valid until it is disposed. Whole tensors copied
/// unchanged (<see cref="CopyTo"/>) are read with positioned reads instead: page faults on a cold map read a disk
/// several times slower than the kernel's read-ahead does.
/// </summary>
public sealed unsafe partial class SafetensorsFile : IDisposable
{
    private readonly FileStream _stream;
    private readonly MemoryMappedFile? _map;
    private readonly MemoryMappedViewAccessor? _view;
    private readonly byte* _base;
    private readonly Dictionary<string, SafetensorsTensor> _byName;
    private bool _disposed;

    private SafetensorsFile(string path, FileStream stream, MemoryMappedFile? map, MemoryMappedViewAccessor? view, byte* basePointer, long dataStart,
        List<SafetensorsTensor> tensors, SafetensorsMetadata metadata)
    {
        Path = path;
        _stream = stream;
        _map = map;
        _view = view;
        _base = basePointer;
        DataStart = dataStart;
        Tensors = tensors;
        Metadata = metadata;
        _byName = tensors.ToDictionary(t => t.Name, StringComparer.Ordinal);
    }

    /// <summary>The file's path.</summary>
    public string Path { get; }

    /// <summary>Byte offset of the data buffer in the file (8 + header length).</summary>
    public long DataStart { get; }

    /// <summary>Every tensor, in the order of its data in the file.</summary>
    public IReadOnlyList<SafetensorsTensor> Tensors { get; }

    /// <summary>The header's <c>__metadata__</c> (empty when absent).</summary>
    public SafetensorsMetadata Metadata { get; }

    /// <summary>Bytes of the whole file.</summary>
    public long FileLength => DataStart + (Tensors.Count == 0 ? 0 : Tensors[^1].End);

    /// <summary>Opens and checks <paramref name="path"/>.</summary>
    /// <exception cref="FileNotFoundException">No such file.</exception>
    /// <exception cref="InvalidDataException">The file breaks the format (the message says where).</exception>
    public static SafetensorsFile Open(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        if (!BitConverter.IsLittleEndian) throw new PlatformNotSupportedException("safetensors data is little-endian; this host is not.");
        long length = new FileInfo(path).Exists ? new FileInfo(path).Length : throw new FileNotFoundException($"No safetensors file at '{path}'.", path);
        string source = System.IO.Path.GetFileName(path);
        if (length < 8) throw new InvalidDataException($"{source}: not a valid safetensors file: {length} bytes, shorter than the 8-byte header length.");

        var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 0, FileOptions.SequentialScan);
        MemoryMappedFile map;
        try
        {
            map = MemoryMappedFile.CreateFromFile(stream, mapName: null, 0, MemoryMappedFileAccess.Read, HandleInheritability.None, leaveOpen: true);
        }
        catch
        {
            stream.Dispose();
            throw;
        }
        MemoryMappedViewAccessor? view = null;
        byte* pointer = null;
        try
        {
            view = map.CreateViewAccessor(0, 0, MemoryMappedFileAccess.Read);
            view.SafeMemoryMappedViewHandle.AcquirePointer(ref pointer);
            pointer += view.PointerOffset;
            ulong headerLength = BinaryPrimitives.ReadUInt64LittleEndian(new ReadOnlySpan<byte>(pointer, 8));
            if (headerLength > (ulong)Math.Min(SafetensorsHeader.MaxHeaderBytes, length - 8))
                throw new InvalidDataException($"{source}: not a valid safetensors file: the header length {headerLength} exceeds " +
                    (headerLength > SafetensorsHeader.MaxHeaderBytes ? $"the 100 MB limit" : $"the {length - 8} bytes after it"));
            long dataStart = 8 + (long)headerLength;
            var (tensors, metadata) = SafetensorsHeader.Parse(new ReadOnlySpan<byte>(pointer + 8, (int)headerLength), length - dataStart, source);
            return new SafetensorsFile(path, stream, map, view, pointer, dataStart, tensors, metadata);
        }
        catch
        {
            if (pointer != null) view!.SafeMemoryMappedViewHandle.ReleasePointer();
            view?.Dispose();
            map.Dispose();
            stream.Dispose();
            throw;
        }
    }

    /// <summary>Whether the file has a tensor named <paramref name="name"/>.</summary>
    public bool Contains(string name) => _byName.ContainsKey(name);

    /// <summary>The tensor named <paramref name="name"/>, or null.</summary>
    public SafetensorsTensor? Find(string name) => _byName.GetValueOrDefault(name);

    /// <summary>The tensor named <paramref name="name"/>.</summary>
    /// <exception cref="CheckpointException">The file has no such tensor.</exception>
    public SafetensorsTensor Get(string name) =>
        _byName.TryGetValue(name, out var t) ? t : throw new CheckpointException(name, $"tensor '{name}' is missing from {System.IO.Path.GetFileName(Path)}.");

    /// <summary>
    /// The raw little-endian bytes of <paramref name="tensor"/> from byte <paramref name="offset"/> on, at most
    /// <paramref name="count"/> bytes (−1: to the end; a span holds at most 2^31 − 1 bytes, so read larger tensors in parts).
    /// </summary>
    public ReadOnlySpan<byte> GetBytes(SafetensorsTensor tensor, long offset = 0, long count = -1)
    {
        CheckOwned(tensor);
        if (offset < 0 || offset > tensor.ByteLength) throw new ArgumentOutOfRangeException(nameof(offset), offset, $"expected 0..{tensor.ByteLength}.");
        long available = tensor.ByteLength - offset;
        if (count < 0) count = available;
        if (count > available) throw new ArgumentOutOfRangeException(nameof(count), count, $"expected at most {available} bytes.");
        if (count > int.MaxValue) throw new ArgumentOutOfRangeException(nameof(count), count, "a span holds at most 2^31 − 1 bytes; read the tensor in parts.");
        return new ReadOnlySpan<byte>(_base + DataStart + tensor.Begin + offset, (int)count);
    }

    /// <summary>
    /// Reads <paramref name="destination"/>.Length elements of a float tensor (F16, BF16, F32 or F64) from element
    /// <paramref name="elementOffset"/> on, widened (or for F64 rounded) to fp32.
    /// </summary>
    /// <exception cref="CheckpointException">The tensor is not a float type.</exception>
    public void ReadSingles(SafetensorsTensor tensor, long elementOffset, Span<float> destination)
    {
        CheckOwned(tensor);
        if (!tensor.DType.IsFloat())
            throw new CheckpointException(tensor.Name, $"tensor '{tensor.Name}' is {tensor.DType.Name()}; expected F16, BF16, F32 or F64 (dequantize fp8/int checkpoints first).");
        if (elementOffset < 0 || elementOffset + destination.Length > tensor.ElementCount)
            throw new ArgumentOutOfRangeException(nameof(elementOffset), elementOffset,
                $"elements {elementOffset}..{elementOffset + destination.Length} lie outside '{tensor.Name}' ({tensor.ElementCount} elements).");
        int size = tensor.DType.Size();
        WillNeed(DataStart + tensor.Begin + elementOffset * size, (long)destination.Length * size);
        const int Chunk = 1 << 26; // elements per span: keeps the byte count of one span below 2^31
        for (int done = 0; done < destination.Length; done += Chunk)
        {
            int n = Math.Min(Chunk, destination.Length - done);
            ElementConversion.ToSingle(GetBytes(tensor, (elementOffset + done) * size, (long)n * size), tensor.DType, destination.Slice(done, n));
        }
    }

    /// <summary>The whole of a float tensor as fp32 (a new array).</summary>
    public float[] ReadSingles(SafetensorsTensor tensor)
    {
        var result = GC.AllocateUninitializedArray<float>(checked((int)tensor.ElementCount)); // every element is read into
        ReadSingles(tensor, 0, result);
        return result;
    }

    /// <summary>Copies the raw bytes of <paramref name="tensor"/> to <paramref name="writer"/> (as the current tensor).</summary>
    public void CopyTo(SafetensorsTensor tensor, SafetensorsWriter writer)
    {
        ArgumentNullException.ThrowIfNull(writer);
        CheckOwned(tensor);
        if (tensor.ByteLength == 0)
        {
            writer.Write(tensor.Name, ReadOnlySpan<byte>.Empty);
            return;
        }
        var buffer = ArrayPool<byte>.Shared.Rent(1 << 22);
        try
        {
            for (long offset = 0; offset < tensor.ByteLength;)
            {
                int want = (int)Math.Min(buffer.Length, tensor.ByteLength - offset);
                int n = RandomAccess.Read(_stream.SafeFileHandle, buffer.AsSpan(0, want), DataStart + tensor.Begin + offset);
                if (n <= 0) throw new InvalidDataException($"{System.IO.Path.GetFileName(Path)} ended inside tensor '{tensor.Name}' (was it truncated while open?).");
                writer.Write(tensor.Name, buffer.AsSpan(0, n));
                offset += n;
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    // Asks the kernel to read a range ahead (Linux madvise WILLNEED): without it a cold map is read a page fault at a
    // time. Advice only: a failure changes nothing.
    private void WillNeed(long fileOffset, long length)
    {
        if (!OperatingSystem.IsLinux() || length < 1 << 20 || s_noMadvise) return;
        long page = Environment.SystemPageSize;
        long start = fileOffset / page * page;
        try
        {
            _ = Madvise((nint)(_base + start), (nuint)(length + fileOffset - start), MadviseWillNeed);
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            s_noMadvise = true;
        }
    }

    private static bool s_noMadvise;

    private const int MadviseWillNeed = 3;

    [LibraryImport("libc", EntryPoint = "madvise", SetLastError = false)]
    private static partial int Madvise(nint address, nuint length, int advice);

    private void CheckOwned(SafetensorsTensor tensor)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(tensor);
        if (!_byName.TryGetValue(tensor.Name, out var own) || !ReferenceEquals(own, tensor))
            throw new ArgumentException($"tensor '{tensor.Name}' does not belong to {System.IO.Path.GetFileName(Path)}.", nameof(tensor));
    }

    /// <summary>Unmaps the file; spans handed out before are invalid afterwards.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        if (_view is not null)
        {
            _view.SafeMemoryMappedViewHandle.ReleasePointer();
            _view.Dispose();
        }
        _map?.Dispose();
        _stream.Dispose();
    }
}
