//! Compiles proto/stripelock.proto in pure Rust (protox): no protoc on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = protox::compile(["proto/stripelock.proto"], ["proto"])?;
    // Bulk data stays in `Bytes`: decoded without a copy (a slice of the received buffer), cut
    // into rows and units without a copy, and a request retried elsewhere is not copied again.
    tonic_prost_build::configure()
        .bytes(".stripelock.v1.PutChunk.data")
        .bytes(".stripelock.v1.FileData.data")
        .bytes(".stripelock.v1.WriteUnitRequest.data")
        .bytes(".stripelock.v1.UnitData.data")
        .bytes(".stripelock.v1.RestoreUnitRequest.data")
        .bytes(".stripelock.v1.WriteRequest.data")
        .bytes(".stripelock.v1.StripeWrite.data")
        .compile_fds(files)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
