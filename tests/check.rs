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
    assert_eq!(packs_read(&r.stdout), e.objects("packs").len());
    assert!(e.ok(&["check"]).stdout.contains("no errors found"));
}

#[test]
fn subsets_read_the_requested_fraction() {
    let e = Env::new();
    setup(&e);
    let total = e.objects("packs").len();
    assert!(total >= 12, "only {total} packs");
    for (spec, expected) in
        [("1/4", total.div_ceil(4)), ("2/4", total.div_ceil(2)), ("50%", total.div_ceil(2)), ("4/4", total)]
    {
        assert_eq!(packs_read(&e.ok(&["check", "--read-data-subset", spec]).stdout), expected, "{spec}");
    }
    for bad in ["5/4", "0/3", "0%", "x"] {
        assert_eq!(e.run(&["check", "--read-data-subset", bad]).code, 2, "{bad} must be refused");
    }
}

#[test]
fn flipped_byte_in_data_pack_is_found_by_read_data_only() {
    let e = Env::new();
    setup(&e);
    let pack = e.objects("packs").into_iter().max_by_key(|p| e.object_size(p)).unwrap();
    e.flip(&pack, 100);
    let name = pack.rsplit('/').next().unwrap().to_string();
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
    let packs = e.objects("packs");
    e.delete_object(&packs[0]);
    let b = e.read_object(&packs[1]);
    e.write_object(&packs[1], &b[..b.len() - 7]);
    let r = e.fails(&["check"]);
    let n0 = packs[0].rsplit('/').next().unwrap();
    let n1 = packs[1].rsplit('/').next().unwrap();
    assert!(r.stderr.contains(n0) && r.stderr.contains("missing"), "{}", r.stderr);
    assert!(r.stderr.contains(n1), "{}", r.stderr);
    assert!(r.stderr.contains("snapshot "), "lost blocks must name the snapshot: {}", r.stderr);
}

#[test]
fn damaged_index_file_is_reported() {
    let e = Env::new();
    setup(&e);
    let idx = &e.objects("index")[0];
    e.flip(idx, 30);
    let r = e.fails(&["check"]);
    assert!(r.stderr.contains(idx.rsplit('/').next().unwrap()), "{}", r.stderr);
}
