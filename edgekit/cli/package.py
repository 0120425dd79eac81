"""`edgekit package`: a package folder as one deterministic zip/tar.gz with CHECKSUMS.sha256; `--verify`
checks an archive without trusting it, `--extract` verifies and unpacks it (edgekit/packaging/archive.py).
Exit codes: 0 ok, 1 content that does not match its checksums or manifest, 2 unsafe or malformed."""

from __future__ import annotations

import argparse

from edgekit.console import emit, out
from edgekit.errors import BadInput
from edgekit.packaging.archive import FORMATS, ArchiveLimits, TamperedArchive, UnsafeArchive, VerifyResult, parse_size

VERB = "package"
ORDER = 100


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except BadInput as e:  # argparse turns this into its one-line usage error
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = ArchiveLimits()
    p = sub.add_parser("package", help="one archive of a package folder (zip|tar.gz with CHECKSUMS.sha256); "
                       "--verify / --extract check one without trusting it")
    p.add_argument("package_dir", nargs="?", metavar="DIR", help="the package folder to archive")
    p.add_argument("--format", choices=list(FORMATS), help="archive format (default: from --out, else zip)")
    p.add_argument("--out", metavar="FILE", help="archive path (default: DIR.zip / DIR.tar.gz beside DIR)")
    p.add_argument("--force", action="store_true", help="replace --out (or the --extract DEST) if it exists")
    p.add_argument("--allow-rejected", action="store_true",
                   help="archive / accept a rejected build (manifest passed=false), e.g. for diagnosis")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--verify", metavar="ARCHIVE", help="check an archive: paths, types, sizes, checksums, manifest")
    mode.add_argument("--extract", nargs=2, metavar=("ARCHIVE", "DEST"),
                      help="verify, then extract into DEST (a new folder, written atomically)")
    p.add_argument("--max-entries", type=int, default=d.max_entries, help=f"(default {d.max_entries})")
    p.add_argument("--max-file-size", type=_size, default=d.max_file_bytes, metavar="SIZE",
                   help="per-file limit while reading, e.g. 512M (default 2G)")
    p.add_argument("--max-total-size", type=_size, default=d.max_total_bytes, metavar="SIZE",
                   help="total uncompressed limit (default 4G)")
    p.add_argument("--max-ratio", type=float, default=d.max_ratio,
                   help=f"largest compression ratio accepted for members over 1 MiB (default {d.max_ratio:g})")


def run(args: argparse.Namespace) -> int:
    from edgekit.packaging.archive import create_archive, extract_archive, verify_archive

    reading = args.verify or args.extract
    if reading and args.package_dir:
        raise BadInput("give either DIR (to archive it) or --verify/--extract ARCHIVE, not both")
    if not reading:
        if not args.package_dir:
            raise BadInput("give a package folder: edgekit package DIR [--format zip|tar.gz] [--out FILE]")
        r = create_archive(args.package_dir, args.out, args.format, allow_rejected=args.allow_rejected,
                           force=args.force)
        out.print(f"wrote {r['archive']}: {r['files']} files ({r['format']}, {r['bytes']:,} bytes), "
                  f"sha256 {r['sha256']}", markup=False, soft_wrap=True)
        emit(r)
        return 0
    if args.out or args.format:
        raise BadInput("--out and --format are for writing an archive; --extract takes ARCHIVE DEST")
    limits = ArchiveLimits(args.max_entries, args.max_file_size, args.max_total_size, args.max_ratio)
    archive = args.verify or args.extract[0]
    try:
        if args.verify:
            result = verify_archive(archive, limits, allow_rejected=args.allow_rejected)
        else:
            result = extract_archive(archive, args.extract[1], limits, allow_rejected=args.allow_rejected,
                                     force=args.force)
    except (TamperedArchive, UnsafeArchive) as e:
        # the whole list for scripts; main prints the one-line error and exits 1 (tampered) or 2 (unsafe)
        emit({"ok": False, "archive": str(archive), "exit_code": e.exit_code, "error": str(e),
              "problems": e.problems})
        raise
    _report(result)
    return 0


def _report(r: VerifyResult) -> None:
    m = r.manifest
    verdict = "passed" if m.get("passed") else "REJECTED build"
    n = len(m.get("artifacts", []))
    out.print(f"ok: {r.archive} ({r.format}, {r.bytes:,} bytes, sha256 {r.sha256}): {len(r.files)} files match "
              f"CHECKSUMS.sha256 and the manifest ({m.get('target')}, {n} artifact{'s' if n != 1 else ''}, "
              f"{verdict})", markup=False, soft_wrap=True)
    if r.dest:
        out.print(f"extracted into {r.dest}", markup=False, soft_wrap=True)
    emit(r.to_dict())

