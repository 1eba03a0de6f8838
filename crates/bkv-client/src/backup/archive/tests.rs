use super::*;
use std::os::unix::fs::{symlink, PermissionsExt};

fn identity() -> age::x25519::Identity {
    age::x25519::Identity::generate()
}

fn sample_tree(root: &Path) {
    fs::create_dir_all(root.join("chats/2026")).unwrap();
    fs::write(root.join("chats/2026/nov.txt"), b"hello").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("script.sh"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("script.sh"), fs::Permissions::from_mode(0o750)).unwrap();
    symlink("chats/2026/nov.txt", root.join("latest")).unwrap();
    filetime::set_file_mtime(
        root.join("empty"),
        filetime::FileTime::from_unix_time(1_700_000_000, 0),
    )
    .unwrap();
    filetime::set_file_mtime(
        root.join("chats"),
        filetime::FileTime::from_unix_time(1_600_000_000, 0),
    )
    .unwrap();
}

fn packed(src: &Path, id: &age::x25519::Identity) -> Vec<u8> {
    pack(src, &id.to_public(), Vec::new(), &|_| {}).unwrap()
}

/// An age file holding `tar` bytes, encrypted to `id`.
fn encrypt_raw(tar: &[u8], id: &age::x25519::Identity) -> Vec<u8> {
    let recipient = id.to_public();
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
            .unwrap();
    let mut out = Vec::new();
    let mut w = encryptor.wrap_output(&mut out).unwrap();
    w.write_all(tar).unwrap();
    w.finish().unwrap();
    out
}

/// A tar with one regular file whose stored name is exactly `name` (no sanitising).
fn tar_with_raw_name(name: &[u8]) -> Vec<u8> {
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_size(4);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&header, &b"evil"[..]).unwrap();
    builder.into_inner().unwrap()
}

#[test]
fn round_trip_keeps_contents_names_modes_mtimes_and_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("src"), dir.path().join("out"));
    sample_tree(&src);
    fs::create_dir(&out).unwrap();
    let id = identity();
    let stats = unpack(&packed(&src, &id)[..], &id, &out).unwrap();
    assert_eq!(stats.entries, 6);
    assert_eq!(fs::read(out.join("chats/2026/nov.txt")).unwrap(), b"hello");
    assert_eq!(fs::read(out.join("empty")).unwrap(), b"");
    let mode = fs::metadata(out.join("script.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o750);
    assert_eq!(
        fs::read_link(out.join("latest")).unwrap(),
        Path::new("chats/2026/nov.txt")
    );
    let mtime = |p: &str| {
        filetime::FileTime::from_last_modification_time(&fs::symlink_metadata(out.join(p)).unwrap())
            .unix_seconds()
    };
    assert_eq!(mtime("empty"), 1_700_000_000);
    assert_eq!(mtime("chats"), 1_600_000_000);
}

#[test]
fn verify_reads_everything_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    sample_tree(dir.path());
    let id = identity();
    let stats = verify(&packed(dir.path(), &id)[..], &id).unwrap();
    assert_eq!(stats.entries, 6);
    assert_eq!(stats.bytes, 5 + 10);
}

#[test]
fn wrong_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    sample_tree(dir.path());
    let archive = packed(dir.path(), &identity());
    assert!(matches!(
        verify(&archive[..], &identity()),
        Err(ArchiveError::Decrypt(_))
    ));
    assert!(matches!(
        verify(&b"not an age file"[..], &identity()),
        Err(ArchiveError::Decrypt(_))
    ));
}

#[test]
fn truncated_or_altered_archive_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("big"), vec![7u8; 300_000]).unwrap();
    let id = identity();
    let archive = packed(&src, &id);
    let truncated = &archive[..archive.len() - 100];
    assert!(matches!(
        verify(truncated, &id),
        Err(ArchiveError::Corrupt(_))
    ));
    let mut altered = archive.clone();
    let middle = altered.len() / 2;
    altered[middle] ^= 1;
    assert!(matches!(
        verify(&altered[..], &id),
        Err(ArchiveError::Corrupt(_))
    ));
    // Cut exactly at a chunk boundary after the tar end: still caught.
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    assert!(unpack(truncated, &id, &out).is_err());
}

#[test]
fn hostile_paths_are_refused_and_nothing_lands_outside() {
    let dir = tempfile::tempdir().unwrap();
    let id = identity();
    for name in [&b"../evil"[..], b"/tmp/bkv-evil-absolute", b"a/../../evil"] {
        let out = dir.path().join(format!("out-{}", name.len()));
        fs::create_dir(&out).unwrap();
        let archive = encrypt_raw(&tar_with_raw_name(name), &id);
        assert!(
            matches!(
                unpack(&archive[..], &id, &out),
                Err(ArchiveError::UnsafePath(_))
            ),
            "{}",
            String::from_utf8_lossy(name)
        );
    }
    assert!(!dir.path().join("evil").exists());
    assert!(!Path::new("/tmp/bkv-evil-absolute").exists());
}

#[test]
fn writing_through_an_archived_symlink_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let mut builder = tar::Builder::new(Vec::new());
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    link.set_mode(0o777);
    builder.append_link(&mut link, "escape", &outside).unwrap();
    let mut file = tar::Header::new_gnu();
    file.set_size(4);
    file.set_mode(0o644);
    builder
        .append_data(&mut file, "escape/pwned", &b"evil"[..])
        .unwrap();
    let id = identity();
    let archive = encrypt_raw(&builder.into_inner().unwrap(), &id);
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    assert!(matches!(
        unpack(&archive[..], &id, &out),
        Err(ArchiveError::UnsafePath(_))
    ));
    assert!(!outside.join("pwned").exists());
}

#[test]
fn a_directory_entry_onto_an_archived_symlink_is_refused() {
    // "a -> outside", then directory "a" with mode 0777: restoring must not chmod outside.
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o700)).unwrap();
    let mut builder = tar::Builder::new(Vec::new());
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    builder.append_link(&mut link, "a", &outside).unwrap();
    let mut directory = tar::Header::new_gnu();
    directory.set_entry_type(tar::EntryType::Directory);
    directory.set_size(0);
    directory.set_mode(0o777);
    builder
        .append_data(&mut directory, "a", std::io::empty())
        .unwrap();
    let id = identity();
    let archive = encrypt_raw(&builder.into_inner().unwrap(), &id);
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    assert!(matches!(
        unpack(&archive[..], &id, &out),
        Err(ArchiveError::UnsafePath(_))
    ));
    assert_eq!(
        fs::metadata(&outside).unwrap().permissions().mode() & 0o777,
        0o700
    );
}

#[test]
fn setuid_bits_are_not_restored() {
    let mut builder = tar::Builder::new(Vec::new());
    let mut file = tar::Header::new_gnu();
    file.set_size(2);
    file.set_mode(0o4755);
    builder.append_data(&mut file, "tool", &b"hi"[..]).unwrap();
    let id = identity();
    let archive = encrypt_raw(&builder.into_inner().unwrap(), &id);
    let dir = tempfile::tempdir().unwrap();
    unpack(&archive[..], &id, dir.path()).unwrap();
    assert_eq!(
        fs::metadata(dir.path().join("tool"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o755
    );
}

#[test]
fn hard_links_and_devices_are_refused() {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Link);
    header.set_size(0);
    builder
        .append_link(&mut header, "hard", "/etc/passwd")
        .unwrap();
    let id = identity();
    let archive = encrypt_raw(&builder.into_inner().unwrap(), &id);
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        unpack(&archive[..], &id, dir.path()),
        Err(ArchiveError::Unsupported { .. })
    ));
}

mod malformed_input {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn random_archives_are_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let id = identity();
            prop_assert!(verify(&bytes[..], &id).is_err());
            let dir = tempfile::tempdir().unwrap();
            prop_assert!(unpack(&bytes[..], &id, dir.path()).is_err());
        }

        #[test]
        fn random_tar_inside_a_valid_age_file_is_refused_or_contained(tar in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let id = identity();
            let archive = encrypt_raw(&tar, &id);
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("out");
            fs::create_dir(&out).unwrap();
            let _ = unpack(&archive[..], &id, &out);
            // Whatever it made, it made inside `out`.
            for entry in fs::read_dir(dir.path()).unwrap() {
                prop_assert_eq!(entry.unwrap().file_name(), "out");
            }
        }
    }
}
