//! `kiln-worker pull NAME`

use kiln_worker::assets;

#[derive(clap::Args)]
pub struct PullArgs {
    /// Model name (smollm2, gemma3, minilm) or Hugging Face repo id (ORG/NAME)
    pub name: String,
}

pub fn main(args: PullArgs) -> anyhow::Result<()> {
    if kiln_worker::assets_hub::looks_like_repo_id(&args.name) && assets::known(&args.name).is_none() {
        let dir = kiln_worker::assets_hub::pull_repo(&args.name, &mut |msg| eprintln!("kiln: {msg}"))?;
        println!("{}", dir.display());
        return Ok(());
    }
    if let Some(d) = kiln_worker::assets_dir::known_directory(&args.name) {
        eprintln!("kiln: {}: {}", d.name, d.description);
        let dir = kiln_worker::assets_dir::pull_directory(d, &mut |msg| eprintln!("kiln: {msg}"))?;
        println!("{}", dir.display());
        return Ok(());
    }
    let m = assets::known(&args.name)
        .ok_or_else(|| anyhow::anyhow!("unknown model `{}` (known: {}; or a Hugging Face repo id ORG/NAME)", args.name, assets::known_names()))?;
    eprintln!("kiln: {}: {}", m.name, m.description);
    let path = assets::pull(m, &mut |msg| eprintln!("kiln: {msg}"))?;
    println!("{}", path.display());
    Ok(())
}
