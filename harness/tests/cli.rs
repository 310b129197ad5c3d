//! The `stowage` command line, run as a user would.

use std::process::Command;

fn stowage() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stowage"))
}

#[test]
fn info_reports_the_tiers_as_json() {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let out = stowage().args(["info", "--json", "--nvme-dir"]).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(matches!(v["device"]["kind"].as_str(), Some("cuda" | "simulated")), "{v}");
    assert_eq!(v["nvme"]["dir"].as_str(), dir.path().to_str());
    assert!(matches!(v["nvme"]["engine"].as_str(), Some("uring" | "psync")), "{v}");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn info_on_an_unusable_directory_fails_with_a_clear_error() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let out = stowage().args(["info", "--nvme-dir"]).arg(file.path()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&file.path().display().to_string()), "names the path: {err}");
}

/// `stowage ppo` defaults the actor's learning rate to the pipeline's PPO rate (1e-4), not
/// SFT's 1e-3, which takes a tuned policy apart in a few iterations.
#[test]
fn ppo_defaults_to_the_ppo_learning_rate() {
    let lr_default = |cmd: &str| {
        let out = stowage().args([cmd, "--help"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let at = text.find("--lr <LR>").unwrap_or_else(|| panic!("no --lr in {cmd} --help"));
        let rest = &text[at..];
        rest[rest.find("[default: ").unwrap() + 10..].split(']').next().unwrap().to_string()
    };
    assert_eq!(lr_default("ppo"), "0.0001");
    assert_eq!(lr_default("sft"), "0.001");
}
