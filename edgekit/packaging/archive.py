"""One-file packages: a package folder as a deterministic zip or tar.gz with CHECKSUMS.sha256, and the
verification that trusts nothing in an archive it is given.

Writing: every regular file of the folder, sorted, with the manifest's build time as every entry's
timestamp and fixed permissions (0644, 0755 where the file is executable), no owner names, a gzip
header without a file name: the same package gives the same bytes (with the same zlib). The
archive is written to a temporary file beside the target and renamed into place.

Reading (`verify_archive`, `extract_archive`): one streaming pass over the members. Names are checked
before anything is read (absolute, `..`, backslashes, drive letters, control characters, duplicates
also after case folding, a file that is also a folder), types too (only regular files and folders:
no links, devices, FIFOs), the entry count, and every member's bytes are counted while they are
decompressed, so a header that lies about sizes cannot get past the per-file and total limits or
the compression-ratio limit. Then CHECKSUMS.sha256 and the manifest's per-file sha256 are compared
with what was actually read. Unsafe or malformed archives raise UnsafeArchive (exit 2); content that
does not match raises TamperedArchive (exit 1).

One module on purpose, over the usual size: it is one thing, the package's archive format, written
and read under the same naming rules, limits and checksum file; the reading half is a single
streaming pass whose checks only make sense together. The manifest, in a folder or in an archive,
is read through packaging/model.py like everywhere else.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import stat
import struct
import tarfile
import unicodedata
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path
from typing import IO, Any

from edgekit.errors import BadInput, VerificationFailed
from edgekit.ingest import sha256_file
from edgekit.packaging.model import MANIFEST, Package, load_package, manifest_from_bytes
from edgekit.untrusted import UnsafeInput
from edgekit.workspace import Staging

CHECKSUMS = "CHECKSUMS.sha256"
FORMATS = {"zip": ".zip", "tar.gz": ".tar.gz"}
GiB = 1 << 30
CHUNK = 1 << 20
META_MAX = 64 << 20  # CHECKSUMS.sha256 and manifest.json are held in memory: they must stay small
RATIO_FLOOR = 1 << 20  # small members may compress extremely well (JSON, zero padding): only ratio-check big ones
GZIP_READ_SLACK = 64 << 10  # compressed bytes gzip may hold unread (8 KiB blocks, buffers): ratio denominator slack
TAR_READ_AHEAD = 64 << 10  # small, so a member's ratio window is not blurred by buffered data
TAR_HEADER_ALLOWANCE = 1 << 20  # pax/long-name headers and padding on top of the members' bytes, per 64 entries
ZIP_CENTRAL_ENTRY_MIN = 46  # bytes of the smallest central-directory record: bounds the entry count by its size
_EPOCH_1980 = datetime(1980, 1, 1, tzinfo=timezone.utc)  # the earliest time a zip can store
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DRIVE = re.compile(r"^[A-Za-z]:")


class UnsafeArchive(BadInput):
    """An archive that must not be read further: unsafe names or types, limits, not an archive (exit 2)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [str(self)]


class TamperedArchive(VerificationFailed):
    """A well-formed archive whose content does not match its checksums or manifest (exit 1)."""

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


@dataclass
class ArchiveLimits:
    max_entries: int = 10_000
    max_file_bytes: int = 2 * GiB
    max_total_bytes: int = 4 * GiB
    max_ratio: float = 100.0  # uncompressed / compressed; deflate tops out near 1032:1, real models ~1-3:1


@dataclass
class VerifyResult:
    archive: Path
    format: str
    bytes: int
    sha256: str
    files: list[str]
    manifest: dict[str, Any]
    dest: Path | None = None
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": not self.problems, "archive": str(self.archive), "format": self.format, "bytes": self.bytes,
                "sha256": self.sha256, "files_checked": len(self.files), "problems": self.problems,
                "target": self.manifest.get("target"), "passed": self.manifest.get("passed"),
                "artifacts": [a.get("key") for a in self.manifest.get("artifacts", [])],
                **({"dest": str(self.dest)} if self.dest else {})}


# ---------------------------------------------------------------- names


def safe_name(raw: str) -> str | None:
    """The entry's path as it will be written under DEST, or why it must not be (ValueError).
    None for the archive's root folder itself (`./`, as `tar -C DIR .` writes)."""
    if not raw:
        raise ValueError("empty name")
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise ValueError("control character in the name")
    if "\\" in raw:
        raise ValueError("backslash in the name (a Windows path separator)")
    if raw.startswith("/"):
        raise ValueError("absolute path")
    if _DRIVE.match(raw) or ":" in raw:
        raise ValueError("colon in the name (a drive letter or an NTFS stream)")
    parts = raw.split("/")
    if ".." in parts:
        raise ValueError("'..' component would write outside the destination")
    return "/".join(p for p in parts if p not in ("", ".")) or None


def _fold(name: str) -> str:
    # Two names a case-insensitive or normalising file system (macOS, Windows) would write to one file.
    return unicodedata.normalize("NFC", name).casefold()


# ---------------------------------------------------------------- writing


def create_archive(package: str | Path, out: str | Path | None = None, fmt: str | None = None, *,
                   allow_rejected: bool = False, force: bool = False) -> dict[str, Any]:
    """Archive a package folder into one file; returns archive path, format, bytes, files, sha256."""
    root = Path(package)
    pkg = load_package(root, complete=True)  # BadInput (one line) when it is not a package
    if not pkg.passed and not allow_rejected:
        raise BadInput(f"{package} is a rejected build (manifest passed=false), not a package; "
                       "pass --allow-rejected to archive it for diagnosis")
    fmt = _format_for(out, fmt)
    dest = Path(out) if out else root.resolve().parent / (root.resolve().name + FORMATS[fmt])
    if dest.resolve().is_relative_to(root.resolve()):
        raise BadInput(f"--out {dest} is inside the package folder; write the archive elsewhere")
    if dest.exists() and not force:
        raise BadInput(f"{dest} exists; choose another --out or pass --force to replace it")
    if dest.exists() and not dest.is_file():
        raise BadInput(f"--out {dest} is not a file")

    files = _package_files(root)
    hashes = {name: sha256_file(root / name) for name in files}
    _check_against_manifest(root, pkg, hashes)
    checksums = "".join(f"{hashes[n]}  {n}\n" for n in files).encode()
    entries: list[tuple[str, Path | bytes, int]] = [(CHECKSUMS, checksums, 0o644)]
    entries += [(n, root / n, 0o755 if (root / n).stat().st_mode & 0o111 else 0o644) for n in files]
    entries.sort(key=lambda e: e[0])
    when = _build_time(pkg.header.get("created"))

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as raw:
            (_write_zip if fmt == "zip" else _write_tar_gz)(raw, entries, when)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return {"archive": str(dest), "format": fmt, "bytes": dest.stat().st_size, "files": len(entries),
            "sha256": sha256_file(dest), "package": str(root), "target": pkg.header.get("target"),
            "passed": pkg.header.get("passed")}


def _format_for(out: str | Path | None, fmt: str | None) -> str:
    by_suffix = next((f for f, ext in FORMATS.items() if out and str(out).endswith(ext)), None)
    if fmt and fmt not in FORMATS:
        raise BadInput(f"--format {fmt}: use zip or tar.gz")
    if fmt and out and by_suffix != fmt:
        raise BadInput(f"--out {out} does not end in {FORMATS[fmt]} as --format {fmt} writes")
    if out and not by_suffix:
        raise BadInput(f"--out {out}: name it .zip or .tar.gz (or pass --format)")
    return fmt or by_suffix or "zip"


def _package_files(root: Path) -> list[str]:
    """Every regular file under root as a relative POSIX path, sorted; links and specials are refused
    (an archive of them would be refused by --verify anyway)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for n in [*dirnames, *filenames]:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            try:
                ok = safe_name(rel) == rel
            except ValueError as e:
                raise BadInput(f"{root}: cannot archive {rel!r}: {e}") from None
            if not ok:
                raise BadInput(f"{root}: cannot archive {rel!r}: not a plain relative path")
            if p.is_symlink():
                raise BadInput(f"{root}: {rel} is a symbolic link; a package holds only regular files")
            if n in filenames:
                if not stat.S_ISREG(p.lstat().st_mode):
                    raise BadInput(f"{root}: {rel} is not a regular file")
                if rel != CHECKSUMS:  # regenerated: an extracted archive archives again to the same bytes
                    files.append(rel)
    return sorted(files)


def _check_against_manifest(root: Path, pkg: Package, hashes: dict[str, str]) -> None:
    """Refuse to seal a folder whose artifacts changed after the build: the archive would certify them."""
    for a in pkg.records:
        for f in a.files:
            got = hashes.get(f.path)
            if got is None:
                raise VerificationFailed(f"{root}: {f.path} is in the manifest ({a.key}) but not in the folder")
            if got != f.sha256:
                raise VerificationFailed(f"{root}: {f.path} differs from the sha256 in its manifest "
                                         f"({a.key}): changed after the build?")


def _build_time(created: Any) -> datetime:
    """The build's own time, so archive timestamps mean something and stay fixed for one package."""
    try:
        t = datetime.fromisoformat(str(created or "").replace("Z", "+00:00"))
        t = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    except ValueError:
        return _EPOCH_1980
    return min(max(t.astimezone(timezone.utc), _EPOCH_1980), datetime(2099, 12, 31, tzinfo=timezone.utc))


def _open_entry(src: Path | bytes) -> IO[bytes]:
    return io.BytesIO(src) if isinstance(src, bytes) else open(src, "rb")


def _write_zip(raw: IO[bytes], entries: list[tuple[str, Path | bytes, int]], when: datetime) -> None:
    with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, src, mode in entries:
            zi = zipfile.ZipInfo(name, date_time=when.timetuple()[:6])
            zi.create_system = 3  # unix: external_attr carries the mode
            zi.external_attr = (stat.S_IFREG | mode) << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            size = len(src) if isinstance(src, bytes) else src.stat().st_size
            with _open_entry(src) as f, zf.open(zi, "w", force_zip64=size >= GiB) as w:
                while chunk := f.read(CHUNK):
                    w.write(chunk)


def _write_tar_gz(raw: IO[bytes], entries: list[tuple[str, Path | bytes, int]], when: datetime) -> None:
    mtime = int(when.timestamp())
    # filename="" and a fixed mtime: gzip's header would otherwise carry the temp name and the clock.
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime, compresslevel=6) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, src, mode in entries:
            ti = tarfile.TarInfo(name)
            ti.size = len(src) if isinstance(src, bytes) else src.stat().st_size
            ti.mtime, ti.mode, ti.type = mtime, mode, tarfile.REGTYPE
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            with _open_entry(src) as f:
                tf.addfile(ti, f)


# ---------------------------------------------------------------- reading


@dataclass
class _Entry:
    raw_name: str
    is_dir: bool
    executable: bool
    stream: Callable[[], IO[bytes]]
    declared_size: int | None = None  # what the header claims; checked early, never trusted
    compressed_size: int | None = None  # zip: the member's compressed bytes (ratio from the header)
    ratio: Callable[[int], float | None] = lambda n: None  # inflated:compressed so far, given bytes read


@dataclass
class _Totals:
    entries: int = 0
    bytes: int = 0


class _CountingReader(io.RawIOBase):
    """Counts the bytes read through it and reports each read to on_read, which may refuse to go on
    (tar.gz: the whole decompressed stream is bounded, pax headers and padding included)."""

    def __init__(self, inner: IO[bytes], on_read: Callable[[int], None] | None = None) -> None:
        self.inner, self.count, self.on_read = inner, 0, on_read

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.inner.read(len(b))
        n = len(data)
        b[:n] = data
        self.count += n
        if self.on_read:
            self.on_read(self.count)
        return n


def sniff_format(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "tar.gz"
    raise UnsafeArchive(f"{path.name}: not a zip or tar.gz archive")


def verify_archive(archive: str | Path, limits: ArchiveLimits | None = None, *,
                   allow_rejected: bool = False) -> VerifyResult:
    """Check an archive without extracting it; raises UnsafeArchive / TamperedArchive."""
    return _read(Path(archive), limits or ArchiveLimits(), None, allow_rejected)


def extract_archive(archive: str | Path, dest: str | Path, limits: ArchiveLimits | None = None, *,
                    allow_rejected: bool = False, force: bool = False) -> VerifyResult:
    """Verify and extract in the same pass into a staging folder beside DEST, which becomes DEST only
    when everything checked out; a refused archive leaves nothing behind."""
    if Path(dest).exists() and not force:
        raise BadInput(f"{dest} exists; choose another DEST or pass --force to replace it")
    with Staging(dest, force=force, flag="DEST") as staging:
        result = _read(Path(archive), limits or ArchiveLimits(), staging.path, allow_rejected)
        result.dest = staging.commit()
    return result


def _read(archive: Path, limits: ArchiveLimits, dest: Path | None, allow_rejected: bool) -> VerifyResult:
    if not archive.is_file():
        raise BadInput(f"archive not found: {archive}")
    fmt = sniff_format(archive)
    label = archive.name
    hashes: dict[str, str] = {}
    meta: dict[str, bytes] = {}
    seen: dict[str, str] = {}  # folded name -> name, files and folders
    dirs: set[str] = set()  # folded names of folders (explicit, and every file's parents)
    totals = _Totals()
    entries = _zip_entries(archive, limits) if fmt == "zip" else _tar_entries(archive, limits)
    try:
        # closing(): a refused entry stops the generator at once, closing the archive it holds open
        with closing(entries):
            for e in entries:
                totals.entries += 1
                if totals.entries > limits.max_entries:
                    raise UnsafeArchive(f"{label}: more than {limits.max_entries} entries (--max-entries)")
                name = _checked_name(label, e, limits, seen, dirs)
                if name is None:
                    continue
                if e.is_dir:
                    if dest is not None:
                        (dest / name).mkdir(parents=True, exist_ok=True)
                    continue
                hashes[name] = _consume(label, name, e, limits, totals, dest, meta)
    except (zipfile.BadZipFile, tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error, struct.error,
            ValueError, NotImplementedError, OSError) as why:  # corrupt headers, names, compressed data
        if isinstance(why, OSError) and not isinstance(why, gzip.BadGzipFile) and why.errno is not None:
            raise  # a real I/O failure (disk full...), not a malformed archive
        raise UnsafeArchive(f"{label}: malformed {fmt} archive ({why})") from None
    problems, manifest = _compare(label, hashes, meta, allow_rejected)
    result = VerifyResult(archive, fmt, archive.stat().st_size, sha256_file(archive), sorted(hashes), manifest,
                          problems=problems)
    if problems:
        n = len(problems) - 1
        more = f" (and {n} more problem{'s' if n > 1 else ''})" if n else ""
        raise TamperedArchive(f"{label}: {problems[0]}{more}", problems)
    return result


def _checked_name(label: str, e: _Entry, limits: ArchiveLimits, seen: dict[str, str], dirs: set[str]) -> str | None:
    """The entry's safe relative path (None: the root folder), after every check its header allows."""
    try:
        name = safe_name(e.raw_name)
    except ValueError as why:
        raise UnsafeArchive(f"{label}: unsafe entry {e.raw_name!r}: {why}") from None
    if name is None:
        return None
    _check_collision(label, name, e.is_dir, seen, dirs)
    if e.declared_size is not None and e.declared_size > limits.max_file_bytes:
        raise UnsafeArchive(f"{label}: entry {name!r} declares {e.declared_size:,} bytes, over the "
                            f"per-file limit of {limits.max_file_bytes:,} (--max-file-size)")
    if (e.declared_size is not None and e.compressed_size is not None and e.declared_size > RATIO_FLOOR
            and e.declared_size > limits.max_ratio * max(e.compressed_size, 1)):
        raise UnsafeArchive(f"{label}: entry {name!r} declares a compression ratio over "
                            f"{limits.max_ratio:g}:1 (a zip bomb?) (--max-ratio)")
    return name


def _check_collision(label: str, name: str, is_dir: bool, seen: dict[str, str], dirs: set[str]) -> None:
    """Refuse two entries that would land on one path (also after case folding), and a path used both
    as a file and as a folder; a folder listed again is harmless."""
    key = _fold(name)
    if not is_dir and key in dirs:
        raise UnsafeArchive(f"{label}: entry {name!r} is a file, but other entries use it as a folder")
    if key in seen and not (is_dir and key in dirs):
        raise UnsafeArchive(f"{label}: duplicate entry {name!r}" + (f" (same file as {seen[key]!r} on a "
                            "case-insensitive file system)" if seen[key] != name else ""))
    parts = key.split("/")
    for i in range(1, len(parts)):
        parent = "/".join(parts[:i])
        if parent in seen and parent not in dirs:
            raise UnsafeArchive(f"{label}: entry {name!r} needs {seen[parent]!r} to be a folder, but it is a file")
        dirs.add(parent)
        seen.setdefault(parent, "/".join(name.split("/")[:i]))
    seen[key] = name
    if is_dir:
        dirs.add(key)


def _consume(label: str, name: str, e: _Entry, limits: ArchiveLimits, totals: _Totals, dest: Path | None,
             meta: dict[str, bytes]) -> str:
    """Read one member in chunks, counting as it inflates; hash it, and write it under dest."""
    h = hashlib.sha256()
    n = 0
    keep = name in (CHECKSUMS, MANIFEST)
    kept: list[bytes] = []
    fd = None
    if dest is not None:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL|O_NOFOLLOW: never through a link, never over another entry (staging is fresh and ours)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755 if e.executable else 0o644)
    try:
        with e.stream() as src:
            while chunk := src.read(CHUNK):
                n += len(chunk)
                totals.bytes += len(chunk)
                if n > limits.max_file_bytes:
                    raise UnsafeArchive(f"{label}: entry {name!r} inflates past the per-file limit of "
                                        f"{limits.max_file_bytes:,} bytes (--max-file-size)")
                if totals.bytes > limits.max_total_bytes:
                    raise UnsafeArchive(f"{label}: entry {name!r} takes the archive past the total limit of "
                                        f"{limits.max_total_bytes:,} bytes (--max-total-size)")
                ratio = e.ratio(n)
                if ratio is not None and ratio > limits.max_ratio:
                    raise UnsafeArchive(f"{label}: entry {name!r} inflates over {limits.max_ratio:g}:1 "
                                        "(a zip bomb?) (--max-ratio)")
                if keep:
                    if n > META_MAX:
                        raise UnsafeArchive(f"{label}: {name} is over {META_MAX >> 20} MiB")
                    kept.append(chunk)
                h.update(chunk)
                if fd is not None:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
    finally:
        if fd is not None:
            os.close(fd)
    if e.declared_size is not None and n != e.declared_size:
        raise UnsafeArchive(f"{label}: entry {name!r} holds {n:,} bytes, its header says {e.declared_size:,}")
    if keep:
        meta[name] = b"".join(kept)
    return h.hexdigest()


def _zip_entries(archive: Path, limits: ArchiveLimits) -> Iterator[_Entry]:
    label = archive.name
    _zip_precheck(archive, limits)
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_entries:
            raise UnsafeArchive(f"{label}: {len(infos)} entries, over the limit of {limits.max_entries} "
                                "(--max-entries)")
        _zip_no_overlap(label, infos)
        for info in infos:
            mode = info.external_attr >> 16 if info.create_system == 3 else 0
            kind = stat.S_IFMT(mode)
            if info.flag_bits & 0x1:
                raise UnsafeArchive(f"{label}: entry {info.filename!r} is encrypted")
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                what = "a symbolic link" if kind == stat.S_IFLNK else "not a regular file (device, FIFO or socket)"
                raise UnsafeArchive(f"{label}: unsafe entry {info.filename!r}: {what}")
            is_dir = info.is_dir() or kind == stat.S_IFDIR
            if is_dir and info.file_size:
                raise UnsafeArchive(f"{label}: entry {info.filename!r} is a folder with content")
            yield _Entry(info.filename, is_dir, bool(mode & 0o111), lambda info=info: zf.open(info),
                         info.file_size, info.compress_size,
                         lambda n, c=info.compress_size: n / max(c, 1) if n > RATIO_FLOOR else None)


def _zip_precheck(archive: Path, limits: ArchiveLimits) -> None:
    """Bound the entry count from the end record before zipfile parses the whole central directory
    into memory (millions of tiny entries are a memory bomb of their own)."""
    with open(archive, "rb") as f:
        end = zipfile._EndRecData(f)  # the parser zipfile itself uses; private but stable since 2.x
    if end is None:
        raise UnsafeArchive(f"{archive.name}: malformed zip archive (no end of central directory)")
    declared, cd_size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if max(declared, cd_size // ZIP_CENTRAL_ENTRY_MIN) > limits.max_entries:
        raise UnsafeArchive(f"{archive.name}: up to {max(declared, cd_size // ZIP_CENTRAL_ENTRY_MIN):,} entries, "
                            f"over the limit of {limits.max_entries} (--max-entries)")


def _zip_no_overlap(label: str, infos: list[zipfile.ZipInfo]) -> None:
    """Members whose data overlap (one compressed block reused by many entries) are the non-recursive
    zip bomb; a real zip never has them."""
    # 30 bytes of local header + the data: a lower bound of each member's span (names and extras vary)
    spans = sorted((i.header_offset, i.header_offset + 30 + i.compress_size, i.filename) for i in infos)
    for (_, end, name), (start, _, nxt) in pairwise(spans):
        if start < end:
            raise UnsafeArchive(f"{label}: entries {name!r} and {nxt!r} overlap (a zip bomb?)")


def _tar_entries(archive: Path, limits: ArchiveLimits) -> Iterator[_Entry]:
    label = archive.name
    stream_cap = limits.max_total_bytes + TAR_HEADER_ALLOWANCE * (1 + limits.max_entries // 64)

    with open(archive, "rb") as f:
        packed = _CountingReader(f)

        def guard(count: int) -> None:
            if count > stream_cap:
                raise UnsafeArchive(f"{label}: the tar stream inflates past {stream_cap:,} bytes (--max-total-size)")
            if count > RATIO_FLOOR and count > limits.max_ratio * max(packed.count, 1):
                raise UnsafeArchive(f"{label}: the tar stream inflates over {limits.max_ratio:g}:1 "
                                    "(a gzip bomb?) (--max-ratio)")

        with gzip.GzipFile(fileobj=io.BufferedReader(packed), mode="rb") as gz:
            inflated = _CountingReader(gz, guard)
            # "r|": strictly sequential, one member at a time, as the data arrives (no seeking back)
            with tarfile.open(fileobj=io.BufferedReader(inflated, TAR_READ_AHEAD), mode="r|") as tf:
                for m in tf:
                    if m.issym() or m.islnk():
                        raise UnsafeArchive(f"{label}: unsafe entry {m.name!r}: a "
                                            f"{'symbolic' if m.issym() else 'hard'} link to {m.linkname!r}")
                    if m.issparse():  # holes inflate to zeros that the archive does not hold
                        raise UnsafeArchive(f"{label}: unsafe entry {m.name!r}: a sparse file")
                    if not (m.isreg() or m.isdir()):
                        raise UnsafeArchive(f"{label}: unsafe entry {m.name!r}: not a regular file "
                                            "(device, FIFO or special)")
                    if m.isreg() and m.name.endswith("/"):
                        raise UnsafeArchive(f"{label}: entry {m.name!r} is a file named like a folder")
                    yield _Entry(m.name, m.isdir(), bool(m.mode & 0o111), lambda m=m: _tar_member(tf, m),
                                 m.size if m.isreg() else None,
                                 ratio=_window_ratio(inflated, packed))


def _window_ratio(inflated: _CountingReader, packed: _CountingReader) -> Callable[[int], float | None]:
    """The stream's ratio since this member began: a bomb appended after real data would hide in the
    ratio of the whole stream. Compressed input is read in blocks, so the slack keeps a block read
    just before the member began (and inflating into it) from counting as infinite compression."""
    i0, p0 = inflated.count, packed.count

    def ratio(n: int) -> float | None:
        grown = inflated.count - i0
        return grown / (packed.count - p0 + GZIP_READ_SLACK) if n > RATIO_FLOOR and grown > RATIO_FLOOR else None

    return ratio


def _tar_member(tf: tarfile.TarFile, m: tarfile.TarInfo) -> IO[bytes]:
    f = tf.extractfile(m)
    assert f is not None, "a regular member always has a file object"
    return f


def _compare(label: str, hashes: dict[str, str], meta: dict[str, bytes],
             allow_rejected: bool) -> tuple[list[str], dict[str, Any]]:
    """What was read against CHECKSUMS.sha256 and the manifest: a list of problems (empty: intact)."""
    if CHECKSUMS not in meta:
        raise UnsafeArchive(f"{label}: no {CHECKSUMS} at the top: not an edgekit package archive")
    listed = _parse_checksums(label, meta[CHECKSUMS])
    problems = []
    for name in sorted(hashes):
        if name == CHECKSUMS:
            continue
        if name not in listed:
            problems.append(f"{name} is not listed in {CHECKSUMS}")
        elif listed[name] != hashes[name]:
            problems.append(f"{name}: sha256 {hashes[name][:16]}… differs from {CHECKSUMS} ({listed[name][:16]}…)")
    problems += [f"{name} is listed in {CHECKSUMS} but missing" for name in sorted(set(listed) - set(hashes))]
    if MANIFEST not in meta:
        if problems:
            return problems, {}
        raise UnsafeArchive(f"{label}: no {MANIFEST} at the top: not an edgekit package archive")
    try:
        manifest = manifest_from_bytes(meta[MANIFEST])
    except UnsafeInput:
        raise  # a path that leaves the package: refused as unsafe (exit 2), not as a mismatch
    except BadInput as e:  # not JSON, not a manifest, not its schema: the content does not match
        return [*problems, str(e)], {}
    pkg = Package(label, manifest)
    for a in pkg.records:
        for f in a.files:
            got = hashes.get(f.path)
            if got is None:
                problems.append(f"{f.path} ({a.key} in {MANIFEST}) is missing")
            elif got != f.sha256:
                problems.append(f"{f.path}: sha256 differs from {MANIFEST} ({a.key})")
    if not pkg.passed and not allow_rejected:
        problems.append(f"{MANIFEST} says the build was rejected (passed=false); pass --allow-rejected to accept it")
    return problems, manifest


def _parse_checksums(label: str, data: bytes) -> dict[str, str]:
    """sha256sum's format: HEX, two spaces (or ' *', binary mode), the path; one per line."""
    listed: dict[str, str] = {}
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise UnsafeArchive(f"{label}: {CHECKSUMS} is not UTF-8 text") from None
    for i, line in enumerate(text.splitlines(), 1):
        digest, sep, path = line[:64], line[64:66], line[66:]
        if not _HEX64.fullmatch(digest) or sep not in ("  ", " *") or not path:
            raise UnsafeArchive(f"{label}: {CHECKSUMS} line {i} is not 'SHA256  PATH'")
        if path in listed:
            raise UnsafeArchive(f"{label}: {CHECKSUMS} lists {path!r} twice")
        listed[path] = digest
    return listed


def parse_size(text: str) -> int:
    """`4G`, `512M`, `100k` or plain bytes (binary units, as the defaults are)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise BadInput(f"size {text!r}: use bytes or a number with K, M, G or T (e.g. 4G)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))
