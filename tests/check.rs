//! `check`: a healthy repository passes; damage is reported by name with a non-zero exit.

mod common;

use common::*;

fn setup(e: &Env) {
    // Small packs so that the repository has many of them.
    e.ok(&["init", "--pack-size", "1"]);
    for (i, seed) in [1u64, 2, 3].iter().enumerate() {
        let p = e.path(&format!("d{i}"));
        write(&p, &random_bytes(*seed, 5 * MIB));
        e.backup(&[p.to_str().unwrap(), "--name", &format!("vm{i}")]);
    }
}

fn packs_read(stdout: &str) -> usize {
    let i = stdout.find("read ").expect("no 'read N packs' in the output");
    stdout[i + 5..].split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn healthy_repository_passes() {
    let e = Env::new();
    setup(&e);
    let r = e.ok(&["check", "--read-data"]);
    assert!(r.stdout.contains("no errors found"), "{}", r.stdout);
    assert_eq!(packs_read(&r.stdout), e.files("packs").len());
    assert!(e.ok(&["check"]).stdout.contains("no errors found"));
}

#[test]
fn subsets_cover_every_pack_once() {
    let e = Env::new();
    setup(&e);
    let total = e.files("packs").len();
    assert!(total >= 12, "only {total} packs");
    let sum: usize =
        (1..=4).map(|n| packs_read(&e.ok(&["check", "--read-data-subset", &format!("{n}/4")]).stdout)).sum();
    assert_eq!(sum, total);
    let bad = e.run(&["check", "--read-data-subset", "5/4"]);
    assert_eq!(bad.code, 2);
}

#[test]
fn flipped_byte_in_data_pack_is_found_by_read_data_only() {
    let e = Env::new();
    setup(&e);
    let pack = e.files("packs").into_iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap();
    let mut b = std::fs::read(&pack).unwrap();
    b[100] ^= 4;
    std::fs::write(&pack, &b).unwrap();
    let name = pack.file_name().unwrap().to_str().unwrap().to_string();
    // The structure check reads headers only and does not see a damaged blob body.
    e.ok(&["check"]);
    let r = e.fails(&["check", "--read-data"]);
    assert!(r.stderr.contains(&name) && r.stderr.contains("data blob"), "{}", r.stderr);
    assert!(r.stderr.contains("authentication failed"), "{}", r.stderr);
}

#[test]
fn missing_and_truncated_packs_are_found_by_structure_check() {
    let e = Env::new();
    setup(&e);
    let packs = e.files("packs");
    std::fs::remove_file(&packs[0]).unwrap();
    let b = std::fs::read(&packs[1]).unwrap();
    std::fs::write(&packs[1], &b[..b.len() - 7]).unwrap();
    let r = e.fails(&["check"]);
    let n0 = packs[0].file_name().unwrap().to_str().unwrap();
    let n1 = packs[1].file_name().unwrap().to_str().unwrap();
    assert!(r.stderr.contains(n0) && r.stderr.contains("missing"), "{}", r.stderr);
    assert!(r.stderr.contains(n1), "{}", r.stderr);
    assert!(r.stderr.contains("snapshot "), "lost blocks must name the snapshot: {}", r.stderr);
}

#[test]
fn damaged_index_file_is_reported() {
    let e = Env::new();
    setup(&e);
    let idx = &e.files("index")[0];
    let mut b = std::fs::read(idx).unwrap();
    b[30] ^= 1;
    std::fs::write(idx, &b).unwrap();
    let r = e.fails(&["check"]);
    assert!(r.stderr.contains(idx.file_name().unwrap().to_str().unwrap()), "{}", r.stderr);
}
