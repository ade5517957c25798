//! Compiles the package-less Workload API proto with the pure-Rust `protox` compiler, so no
//! system `protoc` is needed on a fresh machine. Also compiles the Envoy SDS subset
//! (`envoy/`, `google/rpc/`) and gRPC health, and writes the file descriptor set for reflection.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=workload.proto");
    for dir in ["envoy", "google", "grpc"] {
        println!("cargo:rerun-if-changed={dir}");
    }
    let files = [
        "workload.proto",
        "envoy/service/secret/v3/sds.proto",
        "envoy/extensions/transport_sockets/tls/v3/secret.proto",
        "envoy/extensions/transport_sockets/tls/v3/tls_spiffe_validator_config.proto",
        "grpc/health/v1/health.proto",
        "grpc/reflection/v1/reflection.proto",
        "grpc/reflection/v1alpha/reflection.proto",
    ];
    let fds = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("svidcar_descriptor.bin"),
        protox::prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
