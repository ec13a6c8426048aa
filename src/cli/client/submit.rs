//! `harvest submit`: one config (optionally waiting for its end), several configs as one batch,
//! or a JSON-lines file of submission bodies in batches of 1000.

use super::*;

/// Most sessions in one `POST /v1/sessions/batch` (the server's limit).
const BATCH: usize = 1000;

pub(super) async fn submit(client: &Client, args: SubmitArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.jsonl {
        return submit_jsonl(client, path).await;
    }
    if args.config.len() > 1 {
        if args.session_id.is_some() || args.wait {
            bail!("--session-id and --wait take one config; give one, or drop them");
        }
        let bodies = args
            .config
            .iter()
            .map(|path| submit_body(&args, path))
            .collect::<anyhow::Result<Vec<_>>>()?;
        return submit_batches(client, bodies).await;
    }
    let path = args
        .config
        .first()
        .ok_or_else(|| anyhow!("give a config file"))?;
    let body = submit_body(&args, path)?;
    let session = client.post_json("/v1/sessions", &body).await?;
    if !args.wait {
        return print_json(&session);
    }
    eprintln!(
        "submitted session {}",
        session["id"].as_str().unwrap_or("?")
    );
    wait_session(client, session, args.timeout).await
}

/// Reads a JSON-lines file of submission bodies and submits them in batches.
async fn submit_jsonl(client: &Client, path: &std::path::Path) -> anyhow::Result<()> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    let mut bodies = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let body: Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), n + 1))?;
        if !body.is_object() {
            bail!(
                "{} line {}: each line must be a JSON object (a POST /v1/sessions body)",
                path.display(),
                n + 1
            );
        }
        bodies.push(body);
    }
    if bodies.is_empty() {
        bail!("{}: no sessions in it", path.display());
    }
    submit_batches(client, bodies).await
}

/// Submits `bodies` in batches of [`BATCH`]; prints one JSON line per item (`status`, and `id`
/// or `error`) and a summary on stderr; fails when any item was refused.
async fn submit_batches(client: &Client, bodies: Vec<Value>) -> anyhow::Result<()> {
    let (mut created, mut failed) = (0usize, 0usize);
    let mut out = std::io::stdout().lock();
    for chunk in bodies.chunks(BATCH) {
        let answer = client
            .post_json("/v1/sessions/batch", &json!({"items": chunk}))
            .await?;
        let results = answer["items"]
            .as_array()
            .ok_or_else(|| anyhow!("the server's batch answer has no items"))?;
        // Each item is already one line's worth: `{status, id}` or `{status, error}`.
        for r in results {
            if r.get("id").is_some() {
                created += 1;
            } else {
                failed += 1;
            }
            writeln!(out, "{r}")?;
        }
    }
    drop(out);
    eprintln!("submitted {created} sessions; {failed} refused");
    if failed > 0 {
        bail!(
            "{failed} of {} sessions were refused (see their lines)",
            created + failed
        );
    }
    Ok(())
}

/// The `POST /v1/sessions` body of the config file `path` with the command's flags.
fn submit_body(args: &SubmitArgs, path: &std::path::Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config {}", path.display()))?;
    let params: BTreeMap<String, String> = args.params.iter().cloned().collect();
    let mut body = json!({"config": text, "params": params});
    if let Some(id) = &args.session_id {
        body["session_id"] = json!(id);
    }
    if let Some(o) = options_arg(args.options.as_deref())? {
        body["options"] = o;
    }
    if args.client.is_some() || !args.meta.is_empty() {
        let metadata: serde_json::Map<String, Value> = args
            .meta
            .iter()
            .map(|(k, v)| {
                let value = match serde_json::from_str::<Value>(v) {
                    Ok(j) if !j.is_string() => j,
                    _ => Value::String(v.clone()),
                };
                (k.clone(), value)
            })
            .collect();
        body["client"] = json!({"client_id": args.client, "metadata": metadata});
    }
    Ok(body)
}
