//! `echo-upstream [--listen ADDR] [--name NAME]`: the echo server as a process.

fn main() -> anyhow::Result<()> {
    let mut listen = "127.0.0.1:8080".to_string();
    let mut name = "echo".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().unwrap_or(listen),
            "--name" => name = args.next().unwrap_or(name),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let echo = legate_tests::echo::start(&name, listen.parse()?).await?;
        eprintln!("echo upstream '{}' listening on {}", echo.name, echo.addr);
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}
