//! `kiln-worker pull NAME`

use kiln_worker::assets;

#[derive(clap::Args)]
pub struct PullArgs {
    /// Model name: smollm2 or gemma3
    pub name: String,
}

pub fn main(args: PullArgs) -> anyhow::Result<()> {
    let m = assets::known(&args.name)
        .ok_or_else(|| anyhow::anyhow!("unknown model `{}` (known: {})", args.name, assets::known_names()))?;
    eprintln!("kiln: {}: {}", m.name, m.description);
    let path = assets::pull(m, &mut |msg| eprintln!("kiln: {msg}"))?;
    println!("{}", path.display());
    Ok(())
}
