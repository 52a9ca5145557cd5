namespace KvKernels.Conversion;

/// <summary>
/// An output file written under a temporary name beside its destination and moved into place only by
/// <see cref="Commit"/>, after its bytes are flushed to disk; disposing it uncommitted deletes the temporary file, so a
/// failed write leaves nothing behind, not even a half-written file under the final name.
/// </summary>
public sealed class StagedFile : IDisposable
{
    private FileStream? _stream;
    private bool _committed;

    private StagedFile(string path, bool overwrite, long preallocate)
    {
        Path = System.IO.Path.GetFullPath(path);
        Overwrite = overwrite;
        if (!overwrite && (File.Exists(Path) || Directory.Exists(Path)))
            throw new IOException($"'{Path}' already exists; choose another output or allow overwriting.");
        string directory = System.IO.Path.GetDirectoryName(Path)!;
        Directory.CreateDirectory(directory);
        TemporaryPath = System.IO.Path.Combine(directory, $".{System.IO.Path.GetFileName(Path)}.partial-{Guid.NewGuid():N}");
        _stream = new FileStream(TemporaryPath, new FileStreamOptions
        {
            Mode = FileMode.CreateNew,
            Access = FileAccess.Write,
            Share = FileShare.None,
            BufferSize = 1 << 20,
            PreallocationSize = Math.Max(preallocate, 0),
        });
    }

    /// <summary>The final path.</summary>
    public string Path { get; }

    /// <summary>Where the bytes go until <see cref="Commit"/>.</summary>
    public string TemporaryPath { get; }

    /// <summary>Whether an existing file at <see cref="Path"/> is replaced.</summary>
    public bool Overwrite { get; }

    /// <summary>The stream to write.</summary>
    public Stream Stream => _stream ?? throw new ObjectDisposedException(nameof(StagedFile));

    /// <summary>Creates the temporary file for <paramref name="path"/> (the directory is created when missing).</summary>
    /// <param name="path">Final path.</param>
    /// <param name="overwrite">Replace an existing file; otherwise an existing path is an error now, before any work.</param>
    /// <param name="preallocate">Expected size in bytes (a hint to the file system; 0 for none).</param>
    /// <exception cref="IOException">The path exists and <paramref name="overwrite"/> is false.</exception>
    public static StagedFile Create(string path, bool overwrite = false, long preallocate = 0)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        return new StagedFile(path, overwrite, preallocate);
    }

    /// <summary>Flushes to disk, closes, and renames the temporary file to <see cref="Path"/>.</summary>
    public void Commit()
    {
        var stream = _stream ?? throw new ObjectDisposedException(nameof(StagedFile));
        stream.Flush(flushToDisk: true);
        stream.Dispose();
        _stream = null;
        File.Move(TemporaryPath, Path, Overwrite);
        _committed = true;
    }

    /// <summary>Closes and, when not committed, deletes the temporary file.</summary>
    public void Dispose()
    {
        _stream?.Dispose();
        _stream = null;
        if (!_committed) TryDelete(TemporaryPath);
    }

    private static void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (IOException)
        {
            // Best effort: the name is hidden and marked .partial; nothing reads it.
        }
        catch (UnauthorizedAccessException)
        {
        }
    }
}

/// <summary>
/// An output directory built under a temporary name beside its destination and moved into place only by
/// <see cref="Commit"/>; disposing it uncommitted deletes the temporary directory and everything in it.
/// </summary>
public sealed class StagedDirectory : IDisposable
{
    private bool _committed, _disposed;

    private StagedDirectory(string path, bool overwrite)
    {
        Path = System.IO.Path.TrimEndingDirectorySeparator(System.IO.Path.GetFullPath(path));
        Overwrite = overwrite;
        if (!overwrite && (File.Exists(Path) || Directory.Exists(Path)))
            throw new IOException($"'{Path}' already exists; choose another output or allow overwriting.");
        if (overwrite && File.Exists(Path)) throw new IOException($"'{Path}' is a file; expected a directory or nothing there.");
        string parent = System.IO.Path.GetDirectoryName(Path)!;
        Directory.CreateDirectory(parent);
        TemporaryPath = System.IO.Path.Combine(parent, $".{System.IO.Path.GetFileName(Path)}.partial-{Guid.NewGuid():N}");
        Directory.CreateDirectory(TemporaryPath);
    }

    /// <summary>The final path.</summary>
    public string Path { get; }

    /// <summary>The directory to write into until <see cref="Commit"/>.</summary>
    public string TemporaryPath { get; }

    /// <summary>Whether an existing directory at <see cref="Path"/> is replaced.</summary>
    public bool Overwrite { get; }

    /// <summary>Creates the temporary directory for <paramref name="path"/>.</summary>
    /// <exception cref="IOException">The path exists and <paramref name="overwrite"/> is false.</exception>
    public static StagedDirectory Create(string path, bool overwrite = false)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        return new StagedDirectory(path, overwrite);
    }

    /// <summary>A path inside the temporary directory.</summary>
    public string PathOf(string name) => System.IO.Path.Combine(TemporaryPath, name);

    /// <summary>Moves the temporary directory to <see cref="Path"/> (an existing one is moved aside first, then deleted).</summary>
    public void Commit()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        string? aside = null;
        if (Directory.Exists(Path))
        {
            aside = System.IO.Path.Combine(System.IO.Path.GetDirectoryName(Path)!, $".{System.IO.Path.GetFileName(Path)}.old-{Guid.NewGuid():N}");
            Directory.Move(Path, aside);
        }
        Directory.Move(TemporaryPath, Path);
        _committed = true;
        if (aside is not null) Directory.Delete(aside, recursive: true);
    }

    /// <summary>Deletes the temporary directory when not committed.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        if (_committed) return;
        try
        {
            Directory.Delete(TemporaryPath, recursive: true);
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
    }
}
