//! The vSphere side against the simulator (tests/vcsim): login with pinned or CA-verified TLS, the inventory,
//! Changed Block Tracking commands, and the errors a user meets first.

mod common;

use common::vsphere::Vcsim;
use common::*;

fn vm_cmd(env: &Env, sim: &Vcsim, args: &[&str], extra: &[(&str, &str)]) -> Run {
    let mut c = env.command(args);
    c.envs(sim.env());
    c.envs(extra.iter().copied());
    Run::of(c)
}

#[test]
fn inventory_and_change_tracking_commands() {
    let env = Env::new();
    let sim = Vcsim::start();
    let list = |env: &Env| {
        let r = vm_cmd(env, &sim, &["vm", "list", "--json"], &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        r.json()
    };
    let vms = list(&env);
    let vms = vms.as_array().unwrap();
    assert_eq!(vms.len(), 2);
    for vm in vms {
        assert!(vm["moref"].as_str().unwrap().starts_with("vm-"));
        assert_eq!(vm["power_state"], "poweredOn");
        assert_eq!(vm["cbt_enabled"], false);
        let disks = vm["disks"].as_array().unwrap();
        assert_eq!(disks.len(), 2);
        for d in disks {
            assert_eq!(d["capacity"], 64 << 20);
            assert!(d["file_name"].as_str().unwrap().starts_with("[LocalDS_0] "));
            assert!(sim.flat_file(d["file_name"].as_str().unwrap()).exists());
        }
    }
    let name = vms[0]["name"].as_str().unwrap().to_string();

    let r = vm_cmd(&env, &sim, &["vm", "enable-cbt", &name], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(list(&env)[0]["cbt_enabled"], true);
    // A reset leaves tracking on (after a snapshot cycle that the inventory no longer shows).
    let r = vm_cmd(&env, &sim, &["vm", "reset-cbt", &name], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let after = list(&env);
    assert_eq!((after[0]["cbt_enabled"].as_bool(), after[0]["snapshots"].as_u64()), (Some(true), Some(0)));
    let r = vm_cmd(&env, &sim, &["vm", "disable-cbt", vms[0]["moref"].as_str().unwrap()], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(list(&env)[0]["cbt_enabled"], false);

    // The table form names what matters.
    let r = vm_cmd(&env, &sim, &["vm", "list"], &[]);
    assert!(
        r.stdout.contains(&name) && r.stdout.contains("64.00 MiB") && r.stdout.contains("[LocalDS_0]"),
        "{}",
        r.stdout
    );

    // Trust by CA file and by SHA-1 thumbprint work too.
    let ca = env.path("vcsim-ca.pem");
    write(&ca, sim.ca_pem.as_bytes());
    let r = vm_cmd(
        &env,
        &sim,
        &["vm", "list"],
        &[("DISKVAULT_VSPHERE_THUMBPRINT", ""), ("DISKVAULT_VSPHERE_CA_FILE", ca.to_str().unwrap())],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = vm_cmd(&env, &sim, &["vm", "list"], &[("DISKVAULT_VSPHERE_THUMBPRINT", &sim.sha1)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn vsphere_errors_are_named() {
    let env = Env::new();
    let sim = Vcsim::start();
    let r = vm_cmd(&env, &sim, &["vm", "list"], &[("DISKVAULT_VSPHERE_PASSWORD", "wrong")]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("vSphere Login: InvalidLogin"), "{}", r.stderr);
    // A thumbprint of another certificate: refused before anything is sent.
    let other = sim.sha256.replacen(&sim.sha256[..2], if &sim.sha256[..2] == "00" { "11" } else { "00" }, 1);
    let r = vm_cmd(&env, &sim, &["vm", "list"], &[("DISKVAULT_VSPHERE_THUMBPRINT", &other)]);
    assert!(r.stderr.contains(&format!("not the pinned {other}")), "{}", r.stderr);
    // A CA that did not sign the server's certificate.
    let wrong_ca = env.path("wrong.pem");
    let own = Vcsim::start();
    write(&wrong_ca, own.ca_pem.as_bytes());
    let r = vm_cmd(
        &env,
        &sim,
        &["vm", "list"],
        &[("DISKVAULT_VSPHERE_THUMBPRINT", ""), ("DISKVAULT_VSPHERE_CA_FILE", wrong_ca.to_str().unwrap())],
    );
    assert!(r.stderr.contains("invalid peer certificate"), "{}", r.stderr);
    // Nothing to verify the server with: refused, never silently insecure.
    let r = vm_cmd(&env, &sim, &["vm", "list"], &[("DISKVAULT_VSPHERE_THUMBPRINT", "")]);
    assert!(r.stderr.contains("certificate must be verified"), "{}", r.stderr);
    // Plain HTTP is refused.
    let http = sim.url.replace("https://", "http://");
    let r = vm_cmd(&env, &sim, &["vm", "list"], &[("DISKVAULT_VSPHERE_URL", &http)]);
    assert!(r.stderr.contains("https:// only"), "{}", r.stderr);
    // An unknown VM.
    let r = vm_cmd(&env, &sim, &["vm", "enable-cbt", "no-such-vm"], &[]);
    assert!(r.stderr.contains("no virtual machine named \"no-such-vm\""), "{}", r.stderr);
    // Nobody listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let r = vm_cmd(&env, &sim, &["vm", "list"], &[("DISKVAULT_VSPHERE_URL", &format!("https://127.0.0.1:{port}/sdk"))]);
    assert!(
        r.stderr.contains("vSphere RetrieveServiceContent") && r.stderr.contains("Connection refused"),
        "{}",
        r.stderr
    );
}

#[test]
fn the_vsphere_password_comes_from_a_file_or_a_command() {
    let env = Env::new();
    let sim = Vcsim::start();
    let list = |extra: &[&str]| {
        let mut args = vec!["vm", "list", "--json"];
        args.extend_from_slice(extra);
        let mut c = env.command(&args);
        c.envs(sim.env()).env_remove("DISKVAULT_VSPHERE_PASSWORD");
        Run::of(c)
    };
    let file = env.path("vsphere.password");
    write(&file, format!("{}\nignored second line\n", sim.password).as_bytes());
    let r = list(&["--vsphere-password-file", file.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    let r = list(&["--vsphere-password-command", &format!("echo '{}'", sim.password)]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    write(&file, b"wrong\n");
    let r = list(&["--vsphere-password-file", file.to_str().unwrap()]);
    assert!(r.code != 0 && r.stderr.contains("InvalidLogin"), "{}", r.stderr);
    let r = list(&["--vsphere-password-file", env.path("missing").to_str().unwrap()]);
    assert!(r.code != 0 && r.stderr.contains("cannot read password file"), "{}", r.stderr);
    let r = list(&["--vsphere-password-command", "exit 3"]);
    assert!(r.code != 0 && r.stderr.contains("password command \"exit 3\" failed"), "{}", r.stderr);
    // Without any and without a terminal: the error says where a password can come from.
    let r = list(&[]);
    assert!(r.code != 0 && r.stderr.contains("--vsphere-password-file"), "{}", r.stderr);
}
