//! Compiles keymeter's own protos with protox (pure Rust), so building needs no
//! `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/keymeter/v1/usage.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // The commit built, for keymeter_build_info (a fresh clone has .git; a source
    // tarball says "unknown").
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=KEYMETER_COMMIT={commit}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let fds = protox::compile(protos, ["proto"])?;
    // The descriptors themselves, for gRPC server reflection (grpcurl without -proto).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("keymeter_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
