//! Generates the gRPC service code from `proto/tradeid/v1/tradeid.proto`
//! (needs `protoc`: Debian's protobuf-compiler), plus the descriptor set
//! that server reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_client(false)
        .file_descriptor_set_path(out.join("tradeid_descriptor.bin"))
        .compile_protos(&["proto/tradeid/v1/tradeid.proto"], &["proto"])?;
    Ok(())
}
