//! Compiles `proto/flotilla/v1/*.proto` with a vendored protoc, so a fresh machine needs no
//! system protoc, and writes a descriptor set for gRPC server reflection.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/flotilla/v1/object.proto",
        "proto/flotilla/v1/cluster.proto",
        "proto/flotilla/v1/raft.proto",
        "proto/flotilla/v1/agent.proto",
        "proto/flotilla/v1/fleet.proto",
        "proto/flotilla/v1/adapter.proto",
        "proto/flotilla/v1/autoscale.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("flotilla_v1_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
