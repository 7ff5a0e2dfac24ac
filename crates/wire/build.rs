//! Compiles proto/stripelock.proto in pure Rust (protox): no protoc on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = protox::compile(["proto/stripelock.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(files)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
