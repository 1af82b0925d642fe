//! A fake cloud-hypervisor for tests; see `kiln_sandbox::microvm::fake`.

#[tokio::main(flavor = "current_thread")]
async fn main() {
    std::process::exit(kiln_sandbox::microvm::fake::main_from_env().await);
}
