//! Compiles the package-less Workload API proto with the pure-Rust `protox` compiler, so no
//! system `protoc` is needed on a fresh machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=workload.proto");
    let fds = protox::compile(["workload.proto"], ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
