//! Code packages built in the test: what is accepted, what is refused, and
//! that a refused or failed extraction leaves nothing behind.

use std::fs;
use std::io::{Cursor, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use kiln_code::{extract, extract_with_limits, inspect, inspect_with_limits, CodeError, Limits};
use kiln_core::FcErrorCode;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

fn opts() -> SimpleFileOptions {
    SimpleFileOptions::default().compression_method(CompressionMethod::Deflated)
}

enum E<'a> {
    File(&'a str, &'a [u8], u32),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
}

fn build(entries: &[E<'_>]) -> Vec<u8> {
    let mut w = ZipWriter::new(Cursor::new(Vec::new()));
    for e in entries {
        match e {
            E::File(name, data, mode) => {
                w.start_file(*name, opts().unix_permissions(*mode)).unwrap();
                w.write_all(data).unwrap();
            }
            E::Dir(name) => w.add_directory(*name, opts()).unwrap(),
            E::Symlink(name, target) => w.add_symlink(*name, *target, opts()).unwrap(),
        }
    }
    w.finish().unwrap().into_inner()
}

fn valid() -> Vec<u8> {
    build(&[
        E::File("server.py", b"print('hi')\n", 0o755),
        E::Dir("data/"),
        E::File("lib/util.py", b"X = 1\n", 0o644),
    ])
}

/// Nothing but `keep` in `dir` (no temporary directories left over).
fn assert_only(dir: &Path, keep: &[&str]) {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, keep, "contents of {}", dir.display());
}

fn assert_refused(zip: &[u8], check: impl Fn(&CodeError) -> bool) {
    let e = inspect(zip).unwrap_err();
    assert!(check(&e), "inspect: {e}");
    assert_eq!(
        kiln_core::FcError::from(e).code,
        FcErrorCode::InvalidArgument
    );
    let dir = tempfile::tempdir().unwrap();
    let e = extract(zip, &dir.path().join("code"), None).unwrap_err();
    assert!(check(&e), "extract: {e}");
    assert_only(dir.path(), &[]);
}

#[test]
fn valid_package_inspects_and_extracts_with_modes() {
    let zip = valid();
    let info = inspect(&zip).unwrap();
    assert_eq!(info.size, zip.len() as u64);
    assert_eq!(info.entries, 3);
    assert_eq!(info.unzipped_size, 12 + 6);
    assert_eq!(info.sha256.len(), 64);

    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("code");
    let extracted = extract(&zip, &dest, None).unwrap();
    assert_eq!(extracted, info);
    assert_eq!(fs::read(dest.join("server.py")).unwrap(), b"print('hi')\n");
    assert_eq!(fs::read(dest.join("lib/util.py")).unwrap(), b"X = 1\n");
    let mode = |p: &str| fs::metadata(dest.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("server.py"), 0o755);
    assert_eq!(mode("lib/util.py"), 0o644);
    assert_eq!(mode("data"), 0o755);
    assert_eq!(mode("lib"), 0o755);
    assert_eq!(mode(""), 0o755);
    assert_only(dir.path(), &["code"]);
}

#[test]
fn empty_package_from_the_sdk_is_accepted() {
    // The smallest zip (end of central directory only), as FC's SDK samples send.
    let mut zip = b"PK\x05\x06".to_vec();
    zip.extend_from_slice(&[0; 18]);
    let info = inspect(&zip).unwrap();
    assert_eq!((info.entries, info.unzipped_size), (0, 0));
}

#[test]
fn corrupt_bytes_are_refused() {
    assert_refused(b"definitely not a zip file", |e| {
        matches!(e, CodeError::Corrupt(_))
    });
    assert_refused(b"", |e| matches!(e, CodeError::Corrupt(_)));
    // Damage the compressed data of an entry: deflate or CRC fails.
    let big: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut zip = build(&[E::File("a.bin", &big, 0o644)]);
    for b in &mut zip[60..200] {
        *b ^= 0x5a;
    }
    assert_refused(&zip, |e| matches!(e, CodeError::Corrupt(_)));
}

#[test]
fn truncated_zip_is_refused() {
    let zip = valid();
    for cut in [zip.len() - 1, zip.len() - 10, zip.len() / 2, 30] {
        assert_refused(&zip[..cut], |e| matches!(e, CodeError::Corrupt(_)));
    }
}

#[test]
fn escaping_paths_are_refused() {
    for name in ["../x", "/abs", "a/../../x", "a/..", "..\\x"] {
        let zip = build(&[
            E::File("ok.txt", b"ok", 0o644),
            E::File(name, b"evil", 0o644),
        ]);
        assert_refused(
            &zip,
            |e| matches!(e, CodeError::InvalidEntry { name: n, .. } if n == name),
        );
    }
}

#[test]
fn symlinks_are_refused() {
    let zip = build(&[
        E::File("ok.txt", b"ok", 0o644),
        E::Symlink("link", "/etc/passwd"),
    ]);
    assert_refused(
        &zip,
        |e| matches!(e, CodeError::InvalidEntry { reason, .. } if reason.contains("symbolic link")),
    );
}

#[test]
fn duplicates_and_file_directory_clashes_are_refused() {
    let dup = build(&[E::File("a", b"1", 0o644), E::File("./a", b"2", 0o644)]);
    assert_refused(&dup, |e| matches!(e, CodeError::InvalidEntry { .. }));
    let clash = build(&[E::File("a", b"1", 0o644), E::File("a/b", b"2", 0o644)]);
    assert_refused(&clash, |e| matches!(e, CodeError::InvalidEntry { .. }));
    // Repeated directory entries are harmless.
    inspect(&build(&[
        E::Dir("d/"),
        E::Dir("./d/"),
        E::File("d/f", b"", 0o644),
    ]))
    .unwrap();
}

fn bomb() -> Vec<u8> {
    build(&[E::File("zeros.bin", &vec![0u8; 4 << 20], 0o644)])
}

#[test]
fn zip_bomb_is_refused_by_ratio_and_by_size() {
    let zip = bomb();
    assert!(zip.len() < 64 * 1024, "zeros compress well: {}", zip.len());
    let by_ratio = Limits {
        ratio_min_size: 1 << 20,
        ..Limits::default()
    };
    let e = inspect_with_limits(&zip, &by_ratio).unwrap_err();
    assert!(matches!(e, CodeError::SuspiciousRatio { .. }), "{e}");

    let by_size = Limits {
        unzipped_max: 1 << 20,
        ratio_max: u64::MAX,
        ..Limits::default()
    };
    let e = inspect_with_limits(&zip, &by_size).unwrap_err();
    assert!(matches!(e, CodeError::UnzippedTooLarge { .. }), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let e = extract_with_limits(&zip, &dir.path().join("c"), None, &by_size).unwrap_err();
    assert!(matches!(e, CodeError::UnzippedTooLarge { .. }), "{e}");
    assert_only(dir.path(), &[]);
}

/// A bomb that lies about its size in both headers: counting the bytes
/// actually produced catches it long before it is unpacked.
#[test]
fn entry_larger_than_declared_is_refused() {
    let mut zip = bomb();
    let lie = 1000u32.to_le_bytes();
    zip[22..26].copy_from_slice(&lie); // local header: uncompressed size
    let cd = zip.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
    zip[cd + 24..cd + 28].copy_from_slice(&lie); // central directory
    assert_refused(
        &zip,
        |e| matches!(e, CodeError::Corrupt(m) if m.contains("larger than its declared size")),
    );
}

#[test]
fn entry_and_size_limits() {
    let zip = valid();
    let few = Limits {
        entries_max: 2,
        ..Limits::default()
    };
    assert!(matches!(
        inspect_with_limits(&zip, &few).unwrap_err(),
        CodeError::TooManyEntries { count: 3, limit: 2 }
    ));
    let small = Limits {
        zip_max: 10,
        ..Limits::default()
    };
    assert!(matches!(
        inspect_with_limits(&zip, &small).unwrap_err(),
        CodeError::TooLarge { .. }
    ));
}

#[test]
fn existing_destination_is_refused_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("code");
    fs::create_dir(&dest).unwrap();
    fs::write(dest.join("keep"), b"mine").unwrap();
    let e = extract(&valid(), &dest, None).unwrap_err();
    assert!(matches!(e, CodeError::DestinationExists(_)), "{e}");
    assert_eq!(
        kiln_core::FcError::from(e).code,
        FcErrorCode::InternalServerError
    );
    assert_only(&dest, &["keep"]);
    assert_only(dir.path(), &["code"]);
    // An empty directory or a dangling symlink counts as existing too.
    fs::remove_file(dest.join("keep")).unwrap();
    assert!(extract(&valid(), &dest, None).is_err());
    let link = dir.path().join("link");
    std::os::unix::fs::symlink("/nonexistent", &link).unwrap();
    assert!(matches!(
        extract(&valid(), &link, None),
        Err(CodeError::DestinationExists(_))
    ));
}

#[test]
fn failed_extraction_leaves_nothing() {
    // First entry is fine and gets written; the second is corrupt.
    let big: Vec<u8> = (0..50_000u32).map(|i| (i * 13 % 253) as u8).collect();
    let mut zip = build(&[
        E::File("first.txt", b"fine", 0o644),
        E::File("second.bin", &big, 0o644),
    ]);
    let second = zip.windows(10).position(|w| w == b"second.bin").unwrap();
    for b in &mut zip[second + 40..second + 400] {
        *b ^= 0xff;
    }
    inspect(&zip).unwrap_err();
    let dir = tempfile::tempdir().unwrap();
    let e = extract(&zip, &dir.path().join("code"), None).unwrap_err();
    assert!(matches!(e, CodeError::Corrupt(_)), "{e}");
    assert_only(dir.path(), &[]);
}

#[test]
fn owner_is_applied_when_root() {
    if !nix::unistd::geteuid().is_root() {
        return kiln_test_support::skip(kiln_test_support::Category::Root, "chown needs root");
    }
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("code");
    extract(&valid(), &dest, Some((4242, 4343))).unwrap();
    for p in ["", "server.py", "lib", "lib/util.py", "data"] {
        let m = fs::metadata(dest.join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (4242, 4343), "{p}");
    }
}
