//! Writing the config file back after a change made through the CLI. The file is the
//! operator's: the change is applied to the parsed document (toml_edit), touching only the
//! keys, VIPs and backends that differ, so comments and layout of everything else survive;
//! the new text then replaces the file atomically in the directory of its real target (a
//! symlinked config stays a symlink), with the original's mode and owner.
use std::{
    fs,
    io::Write,
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use toml_edit::{
    Array, ArrayOfTables, DocumentMut, InlineTable, Item, RawString, TableLike, Value,
};

use super::{Config, VipConfig};

/// The first line of a file the agent writes from scratch.
pub(super) const HEADER: &str = "# Written by the lb agent; edit freely, then `kill -HUP` it.\n";

/// Indentation of a list entry the agent adds on a line of its own.
const INDENT: &str = "  ";

/// The text `old` (a config file) edited to say what `new` says: only what differs between
/// the config `old` describes and `new` is rewritten. Fails if `old` does not parse, or if
/// the edit would not read back as exactly `new`.
pub(super) fn edit(old: &str, new: &Config) -> Result<String> {
    let was: Config = toml::from_str(old).map_err(|e| {
        anyhow!(
            "it does not parse ({}): fix it (then `kill -HUP` the agent) and retry",
            e.message().trim_end()
        )
    })?;
    let mut doc: DocumentMut = old.parse()?;
    let agent = doc
        .get_mut("agent")
        .and_then(Item::as_table_like_mut)
        .context("no [agent] table")?;
    set_fields(agent, &was.agent, &new.agent, &[])?;
    edit_list(
        doc.as_table_mut(),
        "vip",
        true,
        &was.vips,
        &new.vips,
        |v| v.name.clone(),
        edit_vip,
    )?;
    let text = doc.to_string();
    let reread: Config = toml::from_str(&text).context("the edited file does not parse")?;
    if reread != *new {
        // E.g. backends reordered in the file, and the file not reloaded since.
        bail!(
            "the file differs from the running config in a way this change cannot merge \
             (edited without `kill -HUP`?): reload or fix it, then retry"
        );
    }
    Ok(text)
}

fn edit_vip(t: &mut dyn TableLike, was: &VipConfig, new: &VipConfig) -> Result<()> {
    set_fields(t, was, new, &["backends"])?;
    edit_list(
        t,
        "backends",
        false,
        &was.backends,
        &new.backends,
        |b| b.address,
        |t, was, new| set_fields(t, was, new, &[]),
    )
}

/// `v` as a fresh inline table (every key, default formatting).
fn inline<T: Serialize>(v: &T) -> Result<InlineTable> {
    match v.serialize(toml_edit::ser::ValueSerializer::new())? {
        Value::InlineTable(t) => Ok(t),
        v => bail!("not a table: {v}"),
    }
}

/// In table `t` (which says `was`), rewrite the keys whose value differs in `new`, add
/// those `new` has and `was` had not, remove those `new` has not. A rewritten value keeps
/// the spacing and comment around it. Keys in `skip` are left to the caller.
fn set_fields<T: Serialize>(t: &mut dyn TableLike, was: &T, new: &T, skip: &[&str]) -> Result<()> {
    let (was, new) = (inline(was)?, inline(new)?);
    for (k, v) in new.iter().filter(|(k, _)| !skip.contains(k)) {
        // Both sides freshly serialized: equal values print equally.
        if was.get(k).is_some_and(|w| w.to_string() == v.to_string()) {
            continue;
        }
        match t.get_mut(k) {
            Some(Item::Value(old)) => {
                let decor = old.decor().clone();
                *old = v.clone();
                *old.decor_mut() = decor;
            }
            Some(item) => *item = Item::Value(v.clone()),
            None => {
                let end = take_end(t);
                t.insert(k, Item::Value(v.clone()));
                put_end(t, end);
            }
        }
    }
    for (k, _) in was.iter() {
        if !skip.contains(&k) && !new.contains_key(k) {
            let end = take_end(t);
            t.remove(k);
            put_end(t, end);
        }
    }
    Ok(())
}

/// Take the blank space after the last value of a table: in an inline table, the space
/// before `}`, which stays at the end when keys are added or removed.
fn take_end(t: &mut dyn TableLike) -> Option<String> {
    let last = t.iter().last()?.0.to_string();
    let v = t.get_mut(&last)?.as_value_mut()?;
    let end = raw(v.decor().suffix()).to_string();
    if end.is_empty() || !end.chars().all(|c| c == ' ' || c == '\t') {
        return None;
    }
    v.decor_mut().set_suffix("");
    Some(end)
}

fn put_end(t: &mut dyn TableLike, end: Option<String>) {
    let Some(end) = end else { return };
    let Some(last) = t.iter().last().map(|(k, _)| k.to_string()) else {
        return;
    };
    if let Some(v) = t.get_mut(&last).and_then(Item::as_value_mut) {
        v.decor_mut().set_suffix(end);
    }
}

/// A list of tables as the file writes it: `[[key]]` tables or an array of inline tables.
enum List<'a> {
    Tables(&'a mut ArrayOfTables),
    Inline(&'a mut Array),
}

impl<'a> List<'a> {
    /// `parent[key]`; if missing, created as `[[key]]` tables or as an array.
    fn of(parent: &'a mut dyn TableLike, key: &str, tables: bool) -> Result<List<'a>> {
        if !parent.contains_key(key) {
            let empty = if tables {
                Item::ArrayOfTables(ArrayOfTables::new())
            } else {
                Item::Value(Value::Array(Array::new()))
            };
            parent.insert(key, empty);
        }
        match parent.get_mut(key) {
            Some(Item::ArrayOfTables(t)) => Ok(List::Tables(t)),
            Some(Item::Value(Value::Array(a))) => Ok(List::Inline(a)),
            _ => bail!("{key} is not a list of tables"),
        }
    }

    fn len(&self) -> usize {
        match self {
            List::Tables(t) => t.len(),
            List::Inline(a) => a.len(),
        }
    }

    fn entry(&mut self, i: usize) -> Result<&mut dyn TableLike> {
        match self {
            List::Tables(t) => Ok(t.get_mut(i).context("no such entry")?),
            List::Inline(a) => Ok(a
                .get_mut(i)
                .and_then(Value::as_inline_table_mut)
                .context("an entry is not a table")?),
        }
    }

    fn remove(&mut self, i: usize) {
        match self {
            List::Tables(t) => t.remove(i),
            List::Inline(a) => remove_value(a, i),
        }
    }

    fn push(&mut self, mut entry: InlineTable) {
        match self {
            List::Tables(t) => {
                // A new `[[vip]]` table writes its backends one a line, like the README.
                for (_, v) in entry.iter_mut() {
                    if let Value::Array(a) = v {
                        if a.iter().all(Value::is_inline_table) {
                            let values: Vec<Value> = std::mem::take(a).into_iter().collect();
                            for v in values {
                                push_value(a, v);
                            }
                        }
                    }
                }
                t.push(entry.into_table());
            }
            List::Inline(a) => push_value(a, Value::InlineTable(entry)),
        }
    }
}

/// Make `parent[key]` (the entries of `was`, in order) say `new`, entries matched by `id`:
/// entries gone from `new` are removed, entries in both edited by `edit_entry` where they
/// differ, new ones appended. A missing list is created as `[[key]]` tables if `tables`.
fn edit_list<T: Serialize + PartialEq, K: PartialEq>(
    parent: &mut dyn TableLike,
    key: &str,
    tables: bool,
    was: &[T],
    new: &[T],
    id: impl Fn(&T) -> K,
    mut edit_entry: impl FnMut(&mut dyn TableLike, &T, &T) -> Result<()>,
) -> Result<()> {
    if was == new {
        return Ok(());
    }
    let mut list = List::of(parent, key, tables)?;
    if list.len() != was.len() {
        bail!("{key}: {} entries, {} read", list.len(), was.len());
    }
    let mut kept: Vec<&T> = was.iter().collect();
    for i in (0..was.len()).rev() {
        if !new.iter().any(|n| id(n) == id(&was[i])) {
            list.remove(i);
            kept.remove(i);
        }
    }
    for (i, w) in kept.iter().enumerate() {
        if let Some(n) = new.iter().find(|n| id(n) == id(w)) {
            if *w != n {
                edit_entry(list.entry(i)?, w, n)?;
            }
        }
    }
    for n in new.iter().filter(|n| !was.iter().any(|w| id(w) == id(n))) {
        list.push(inline(n)?);
    }
    Ok(())
}

fn raw(s: Option<&RawString>) -> &str {
    s.and_then(RawString::as_str).unwrap_or("")
}

/// Remove entry `i` of an array with the comment on its line: that comment is stored
/// before the next entry (or at the end of the array), not with the entry.
fn remove_value(a: &mut Array, i: usize) {
    a.remove(i);
    let drop_line_comment = |s: &str| match s.split_once('\n') {
        Some((line, rest)) if line.trim_start().starts_with('#') => format!("\n{rest}"),
        _ => s.to_string(),
    };
    if let Some(next) = a.get_mut(i) {
        let mut prefix = drop_line_comment(raw(next.decor().prefix()));
        if i == 0 && !prefix.contains('\n') {
            prefix.clear(); // `[ b]` -> `[b]`
        }
        next.decor_mut().set_prefix(prefix);
    } else {
        let trailing = drop_line_comment(a.trailing().as_str().unwrap_or(""));
        a.set_trailing(trailing);
    }
}

/// Append `v` formatted as the array is: on a line of its own, indented as the entry
/// before it, unless the array is written on one line.
fn push_value(a: &mut Array, mut v: Value) {
    let last_prefix = a.iter().last().map(|l| raw(l.decor().prefix()).to_string());
    match last_prefix {
        Some(p) if !p.contains('\n') => a.push(v),
        last => {
            let indent = last
                .as_deref()
                .and_then(|p| p.rsplit_once('\n'))
                .map(|(_, i)| i)
                .filter(|i| i.chars().all(char::is_whitespace))
                .unwrap_or(INDENT);
            let mut prefix = format!("\n{indent}");
            if a.is_empty() {
                a.set_trailing_comma(true);
                a.set_trailing("\n");
            }
            // A comment after the last entry, on its line, stays there.
            let trailing = a.trailing().as_str().unwrap_or("").to_string();
            if let Some((line, rest)) = trailing.split_once('\n') {
                if line.trim_start().starts_with('#') {
                    prefix = format!("{line}{prefix}");
                    a.set_trailing(format!("\n{rest}"));
                }
            }
            v.decor_mut().set_prefix(prefix);
            v.decor_mut().set_suffix("");
            a.push_formatted(v);
        }
    }
}

/// The file a path names: symlinks resolved, so that the write replaces the target and
/// the link stays. A path that does not exist yet is its own target.
pub(super) fn resolve(path: &Path) -> Result<PathBuf> {
    match fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound && fs::symlink_metadata(path).is_err() =>
        {
            Ok(path.to_path_buf())
        }
        Err(e) => Err(e).with_context(|| format!("resolving {}", path.display())),
    }
}

/// Replace `target` by `text` atomically: a temporary file in the same directory gets the
/// text, the owner and mode of `like` (the file replaced; 0644 for a new file), is synced
/// and renamed onto `target`, then the directory is synced.
pub(super) fn write_atomically(
    target: &Path,
    text: &[u8],
    like: Option<&fs::Metadata>,
) -> Result<()> {
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .with_context(|| format!("{} is not a file name", target.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp); // left by a crash of an earlier process of this id
    let written = (|| -> Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text)?;
        match like {
            Some(m) => {
                let mine = f.metadata()?;
                if (mine.uid(), mine.gid()) != (m.uid(), m.gid()) {
                    // Before the mode: chown clears set-id bits.
                    std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))
                        .with_context(|| format!("giving {} its owner", tmp.display()))?;
                }
                f.set_permissions(fs::Permissions::from_mode(m.mode() & 0o7777))?;
            }
            None => f.set_permissions(fs::Permissions::from_mode(0o644))?,
        }
        f.sync_all()?;
        fs::rename(&tmp, target)
            .with_context(|| format!("renaming {} onto {}", tmp.display(), target.display()))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
