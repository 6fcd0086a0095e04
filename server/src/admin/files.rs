//! The configuration and keys files as the admin service rewrites them: read, changed in
//! place (a key taken out, a group's limits set) keeping every comment and line it does not
//! touch, and replaced atomically.

use super::*;

/// The keys file `AddKey` and `RemoveKey` write.
pub(super) fn keys_file(running: &Settings) -> Result<PathBuf, AdminError> {
    running.keys_file.clone().ok_or_else(|| {
        AdminError::Refused(
            "no keys file is configured (key_sources.file or --keys-file): keys added at run time live there".into(),
        )
    })
}

pub(super) fn read(path: &Path) -> Result<String, AdminError> {
    std::fs::read_to_string(path).map_err(|e| file_error(path, format!("cannot read: {e}")))
}

/// Replaces `path` with `text` at once: a new file beside it (mode `mode`, else the umask's),
/// synced, renamed over it, and the directory synced. A crash leaves the old file or the new.
/// A link is written through: the file it points to is replaced, and the link stays.
pub(super) fn replace_file(path: &Path, text: &str, mode: Option<u32>) -> Result<(), AdminError> {
    use std::os::unix::fs::OpenOptionsExt;
    let target = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => std::fs::canonicalize(path)
            .map_err(|e| file_error(path, format!("cannot follow the link: {e}")))?,
        _ => path.to_path_buf(),
    };
    let path = target.as_path();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temporary = dir.join(format!(".{name}.keylease-{}", std::process::id()));
    let written = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        if let Some(mode) = mode {
            options.mode(mode);
        }
        let mut file = options.open(&temporary)?;
        if let Some(mode) = mode {
            // The umask may have narrowed it; never widened.
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        }
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        file_error(path, format!("cannot write: {e}"))
    })
}

/// `text` without the lines that configure `secret` (the key first on its line, or the value of
/// a `NAME=VALUE` line).
pub(super) fn without_key(text: &str, secret: &str) -> String {
    let mut kept = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let content = line.split(" #").next().unwrap_or(line).trim();
        let content = content.strip_prefix("export ").unwrap_or(content).trim();
        let first = content.split_whitespace().next().unwrap_or("");
        let value = first
            .split_once('=')
            .map(|(_, v)| v.trim_matches(['"', '\'']))
            .unwrap_or("");
        if first == secret || value == secret {
            continue;
        }
        kept.push_str(line);
    }
    kept
}

/// The config file `text` with the given limits of `model` in `pool` (for `project` when not
/// empty): a value sets the limit, 0 removes it. Comments and layout elsewhere stay.
pub(super) fn with_limits(
    text: &str,
    pool: &str,
    project: &str,
    model: &str,
    changes: &[(&str, Option<u64>)],
) -> Result<String, String> {
    let mut document: toml_edit::DocumentMut = text
        .parse()
        .map_err(|_| "not valid TOML (reload it to see where)".to_string())?;
    let pools = table_in(document.as_table_mut(), "pools")?;
    let pool_table = table_in(pools, pool)?;
    let models = if project.is_empty() {
        table_in(pool_table, "models")?
    } else {
        table_in(table_in(pool_table, "projects")?, project)?
    };
    // The model as the file names it, `models/…` or not.
    let key = models
        .iter()
        .map(|(k, _)| k.to_string())
        .find(|k| canonical_model(k) == model)
        .unwrap_or_else(|| model.to_string());
    let limits = table_in(models, &key)?;
    for (field, value) in changes {
        match value {
            None => {}
            Some(0) => {
                limits.remove(field);
            }
            Some(value) => {
                limits.insert(field, toml_edit::value(*value as i64));
            }
        }
    }
    Ok(document.to_string())
}

/// The table `name` in `table`, made when missing.
pub(super) fn table_in<'t>(
    table: &'t mut toml_edit::Table,
    name: &str,
) -> Result<&'t mut toml_edit::Table, String> {
    let item = table
        .entry(name)
        .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()));
    if let Some(inline) = item.as_inline_table_mut() {
        let table = std::mem::take(inline).into_table();
        *item = toml_edit::Item::Table(table);
    }
    item.as_table_mut()
        .ok_or_else(|| format!("`{name}` is not a table"))
}
