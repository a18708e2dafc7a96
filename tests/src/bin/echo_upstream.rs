//! `echo-upstream [--listen ADDR] [--name NAME] [--message TEXT]`: the echo
//! server as a process. With `--message` every request is answered with
//! exactly TEXT (what go-control-plane's integration driver expects of its
//! upstream).

fn main() -> anyhow::Result<()> {
    let mut listen = "127.0.0.1:8080".to_string();
    let mut name = "echo".to_string();
    let mut message = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().unwrap_or(listen),
            "--name" => name = args.next().unwrap_or(name),
            "--message" => message = args.next(),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let addr = listen.parse()?;
        let echo = match message {
            Some(m) => legate_tests::echo::start_fixed(&name, addr, m).await?,
            None => legate_tests::echo::start(&name, addr).await?,
        };
        eprintln!("echo upstream '{}' listening on {}", echo.name, echo.addr);
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}
