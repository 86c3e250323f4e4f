//! Generates the gRPC client for `loadgen rpc` from the server's proto
//! (`proto/tradeid/v1/tradeid.proto`; needs `protoc`, as the server does).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/tradeid");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["../proto/tradeid/v1/tradeid.proto"], &["../proto"])?;
    Ok(())
}
