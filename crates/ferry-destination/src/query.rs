//! List query modes (SPEC §1.6): `$filter`, `$select=Name`, and paging with `$page`,
//! `$pageSize`, `$pageCount`, `$entityCount`. The three modes exclude each other; a request
//! that mixes them, or gives a value out of range, is a 400 that names the parameter.

/// Largest `$pageSize` (SPEC §1.6).
pub(crate) const MAX_PAGE_SIZE: usize = 1000;
const DEFAULT_PAGE_SIZE: usize = 10;

/// Largest `modifiedwithin` window in minutes (SPEC §1.6: one day).
const MAX_MODIFIED_WITHIN: u32 = 1440;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Filter {
    In(Vec<String>),
    StartsWith(String),
    EndsWith(String),
    /// Created or changed within this many minutes.
    ModifiedWithin(u32),
    /// `Label['k'] HAS ('v1','v2') AND ...`: every clause must hold; a clause holds when the
    /// object's label `k` has at least one of the values.
    Labels(Vec<(String, Vec<String>)>),
}

/// What a filter looks at of one listed object.
pub(crate) struct Item<'a> {
    pub name: &'a str,
    /// Unix seconds.
    pub modified_at: i64,
    /// `(key, values)` of the object's labels.
    pub labels: &'a [(String, Vec<String>)],
}

impl Filter {
    pub(crate) fn matches(&self, item: &Item<'_>, now: i64) -> bool {
        let name = item.name;
        match self {
            Filter::In(names) => names.iter().any(|n| n == name),
            Filter::StartsWith(p) => name.starts_with(p.as_str()),
            Filter::EndsWith(s) => name.ends_with(s.as_str()),
            Filter::ModifiedWithin(minutes) => now.saturating_sub(item.modified_at) <= i64::from(*minutes) * 60,
            Filter::Labels(clauses) => clauses.iter().all(|(key, wanted)| {
                item.labels.iter().any(|(k, values)| k == key && values.iter().any(|v| wanted.contains(v)))
            }),
        }
    }

    /// Whether matching needs the objects' labels (read from their own rows).
    pub(crate) fn needs_labels(&self) -> bool {
        matches!(self, Filter::Labels(_))
    }
}

/// `$includeMetadata=modification_time;etag` on destination lists (SPEC §1.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Metadata {
    pub modification_time: bool,
    pub etag: bool,
}

impl Metadata {
    pub(crate) fn any(self) -> bool {
        self.modification_time || self.etag
    }
}

/// Reads `$includeMetadata` of a list request in `mode`: allowed in the default mode only
/// (alone or with `$filter`).
pub(crate) fn parse_metadata(query: Option<&str>, mode: &Mode) -> Result<Metadata, String> {
    let mut given =
        form_urlencoded::parse(query.unwrap_or_default().as_bytes()).filter(|(k, _)| k == "$includeMetadata");
    let Some((_, value)) = given.next() else { return Ok(Metadata::default()) };
    if given.next().is_some() {
        return Err("Query parameter $includeMetadata is given more than once".into());
    }
    if matches!(mode, Mode::SelectName | Mode::Page(_)) {
        return Err("$includeMetadata cannot be combined with $select or paging ($page, ...); use it alone or with \
                    $filter"
            .into());
    }
    let mut metadata = Metadata::default();
    for item in value.split(';').map(str::trim) {
        match item {
            "modification_time" => metadata.modification_time = true,
            "etag" => metadata.etag = true,
            other => {
                return Err(format!(
                    "$includeMetadata='{value}': '{other}' is not a metadata name; use modification_time and/or \
                     etag, separated by ';'"
                ));
            }
        }
    }
    Ok(metadata)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Paging {
    pub page: usize,
    pub size: usize,
    pub page_count: bool,
    pub entity_count: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum Mode {
    #[default]
    All,
    Filter(Filter),
    SelectName,
    Page(Paging),
}

/// Parses the query string of a list request.
pub(crate) fn parse(query: Option<&str>) -> Result<Mode, String> {
    let mut filter = None;
    let mut select = None;
    let (mut page, mut size, mut page_count, mut entity_count) = (None, None, None, None);
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let slot = match &*k {
            "$filter" => &mut filter,
            "$select" => &mut select,
            "$page" => &mut page,
            "$pageSize" => &mut size,
            "$pageCount" => &mut page_count,
            "$entityCount" => &mut entity_count,
            _ => continue,
        };
        if slot.replace(v.into_owned()).is_some() {
            return Err(format!("Query parameter {k} is given more than once"));
        }
    }
    let paging_params = size.is_some() || page_count.is_some() || entity_count.is_some();
    let given = [filter.is_some(), select.is_some(), page.is_some() || paging_params].iter().filter(|b| **b).count();
    if given > 1 {
        return Err("$filter, $select and paging ($page, $pageSize, $pageCount, $entityCount) cannot be combined; \
                    use one of them"
            .into());
    }
    if let Some(f) = filter {
        return parse_filter(&f).map(Mode::Filter);
    }
    if let Some(s) = select {
        return if s.trim() == "Name" {
            Ok(Mode::SelectName)
        } else {
            Err(format!("$select='{s}' is not supported; only $select=Name is"))
        };
    }
    if page.is_none() && paging_params {
        return Err("$pageSize, $pageCount and $entityCount need $page (the page number, from 1)".into());
    }
    let Some(page) = page else { return Ok(Mode::All) };
    let page = page
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|p| *p >= 1)
        .ok_or_else(|| format!("$page='{page}' is not a page number; pages count from 1"))?;
    let size = match size {
        None => DEFAULT_PAGE_SIZE,
        Some(s) => s
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
            .ok_or_else(|| format!("$pageSize='{s}' must be a number from 1 to {MAX_PAGE_SIZE}"))?,
    };
    let flag = |name: &str, v: Option<String>| match v.as_deref().map(str::trim) {
        None => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => Err(format!("{name}='{v}' must be true or false")),
    };
    Ok(Mode::Page(Paging {
        page,
        size,
        page_count: flag("$pageCount", page_count)?,
        entity_count: flag("$entityCount", entity_count)?,
    }))
}

const FILTER_HELP: &str = "use Name in ('a','b'), startswith(Name,'prefix'), endswith(Name,'suffix'), \
    modifiedwithin('30','minutes') or Label['key'] HAS ('v1','v2') [AND Label['k2'] HAS (...)]; quote values with ', \
    doubling a ' inside";

/// `Name in ('a','b')`, `startswith(Name,'x')`, `endswith(Name,'x')`, `modifiedwithin('n',
/// 'minutes')`, `Label['k'] HAS ('v', ...) AND ...`.
pub(crate) fn parse_filter(f: &str) -> Result<Filter, String> {
    let bad = || format!("$filter='{f}' is not understood: {FILTER_HELP}");
    let s = f.trim();
    if s.starts_with("Label[") {
        return parse_labels(s).ok_or_else(bad);
    }
    if let Some(rest) = s.strip_prefix("modifiedwithin") {
        let inner = rest.trim_start().strip_prefix('(').and_then(|r| r.trim_end().strip_suffix(')')).ok_or_else(bad)?;
        let (number, after) = quoted(inner.trim_start()).ok_or_else(bad)?;
        let (unit, after) =
            quoted(after.trim_start().strip_prefix(',').ok_or_else(bad)?.trim_start()).ok_or_else(bad)?;
        if !after.trim().is_empty() {
            return Err(bad());
        }
        if unit != "minutes" {
            return Err(format!("$filter='{f}': modifiedwithin takes the unit 'minutes' only, not '{unit}'"));
        }
        return number
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_MODIFIED_WITHIN).contains(n))
            .map(Filter::ModifiedWithin)
            .ok_or_else(|| {
                format!("$filter='{f}': the number of minutes must be a whole number from 1 to {MAX_MODIFIED_WITHIN}")
            });
    }
    if let Some(rest) = s.strip_prefix("Name").map(str::trim_start).and_then(|r| r.strip_prefix("in")) {
        let rest = rest.trim();
        let inner = rest.strip_prefix('(').and_then(|r| r.strip_suffix(')')).ok_or_else(bad)?;
        let mut values = Vec::new();
        let mut cur = inner.trim();
        loop {
            let (value, after) = quoted(cur).ok_or_else(bad)?;
            values.push(value);
            let after = after.trim_start();
            if after.is_empty() {
                break;
            }
            cur = after.strip_prefix(',').ok_or_else(bad)?.trim_start();
        }
        return Ok(Filter::In(values));
    }
    for (func, make) in [
        ("startswith", Filter::StartsWith as fn(String) -> Filter),
        ("endswith", Filter::EndsWith as fn(String) -> Filter),
    ] {
        if let Some(rest) = s.strip_prefix(func) {
            let inner = rest.trim_start().strip_prefix('(').and_then(|r| r.strip_suffix(')')).ok_or_else(bad)?;
            let arg = inner.trim_start().strip_prefix("Name").ok_or_else(bad)?.trim_start();
            let arg = arg.strip_prefix(',').ok_or_else(bad)?.trim_start();
            let (value, after) = quoted(arg).ok_or_else(bad)?;
            if !after.trim().is_empty() {
                return Err(bad());
            }
            return Ok(make(value));
        }
    }
    Err(bad())
}

/// `Label['k'] HAS ('v1','v2') AND Label['k2'] HAS ('v3')`, as the SAP Cloud SDK for Python
/// writes it (keys and values percent-encoded inside the quotes).
fn parse_labels(s: &str) -> Option<Filter> {
    let mut clauses = Vec::new();
    let mut rest = s;
    loop {
        let (key, after) = quoted(rest.strip_prefix("Label[")?.trim_start())?;
        let after = after.trim_start().strip_prefix(']')?.trim_start();
        let after = strip_keyword(after, "HAS")?.trim_start().strip_prefix('(')?;
        let mut values = Vec::new();
        let mut cur = after.trim_start();
        loop {
            let (value, after) = quoted(cur)?;
            values.push(value);
            let after = after.trim_start();
            if let Some(after) = after.strip_prefix(')') {
                cur = after;
                break;
            }
            cur = after.strip_prefix(',')?.trim_start();
        }
        clauses.push((key, values));
        let cur = cur.trim_start();
        if cur.is_empty() {
            return Some(Filter::Labels(clauses));
        }
        rest = strip_keyword(cur, "AND")?.trim_start();
    }
}

/// `s` without a leading keyword (any case) that is followed by a space or `(`.
fn strip_keyword<'a>(s: &'a str, keyword: &str) -> Option<&'a str> {
    let head = s.get(..keyword.len())?;
    let rest = &s[keyword.len()..];
    (head.eq_ignore_ascii_case(keyword) && rest.starts_with([' ', '('])).then_some(rest)
}

/// A single-quoted value at the start of `s` (`''` is a quote), percent-decoded as SPEC §1.6
/// says clients encode values; returns it and the rest of `s`.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut chars = s.strip_prefix('\'')?.char_indices().peekable();
    let body = &s[1..];
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        if c == '\'' {
            if chars.peek().map(|(_, c)| *c) == Some('\'') {
                chars.next();
                out.push('\'');
                continue;
            }
            let decoded = percent_decode(&out)?;
            return Some((decoded, &body[i + 1..]));
        }
        out.push(c);
    }
    None
}

fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        assert_eq!(parse_filter("Name in ('a','b')"), Ok(Filter::In(vec!["a".into(), "b".into()])));
        assert_eq!(parse_filter(" Name in ( 'a%27b' , 'c''d' ) "), Ok(Filter::In(vec!["a'b".into(), "c'd".into()])));
        assert_eq!(parse_filter("startswith(Name, 'pre''fix')"), Ok(Filter::StartsWith("pre'fix".into())));
        assert_eq!(parse_filter("endswith(Name,'x')"), Ok(Filter::EndsWith("x".into())));
        for bad in ["Name in ()", "Name in ('a'", "Name eq 'a'", "startswith(URL,'x')", "endswith(Name,'x') or 1", ""] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_filter("modifiedwithin('30', 'minutes')"), Ok(Filter::ModifiedWithin(30)));
        assert_eq!(parse_filter("modifiedwithin( '1440','minutes' )"), Ok(Filter::ModifiedWithin(1440)));
        for bad in [
            "modifiedwithin('0', 'minutes')",
            "modifiedwithin('1441', 'minutes')",
            "modifiedwithin('1.5', 'minutes')",
            "modifiedwithin('30', 'hours')",
            "modifiedwithin('30')",
            "modifiedwithin(30, 'minutes')",
        ] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_filter("Label['env'] HAS ('prod', 'e%27u') AND Label['team'] has ('a')"),
            Ok(Filter::Labels(vec![
                ("env".into(), vec!["prod".into(), "e'u".into()]),
                ("team".into(), vec!["a".into()])
            ]))
        );
        for bad in [
            "Label['env'] HAS ()",
            "Label['env'] HAS ('a'",
            "Label['env'] ('a')",
            "Label[env] HAS ('a')",
            "Label['env'] HAS ('a') AND",
            "Label['env'] HAS ('a') OR Label['b'] HAS ('c')",
            "Label['env'] HASX ('a')",
        ] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn filter_matching() {
        let labels = vec![("env".to_owned(), vec!["prod".to_owned(), "eu".to_owned()])];
        let item = Item { name: "d", modified_at: 1_000, labels: &labels };
        assert!(Filter::ModifiedWithin(1).matches(&item, 1_060));
        assert!(!Filter::ModifiedWithin(1).matches(&item, 1_061));
        let f = |s: &str| parse_filter(s).unwrap();
        assert!(f("Label['env'] HAS ('dev','eu')").matches(&item, 0));
        assert!(!f("Label['env'] HAS ('dev')").matches(&item, 0));
        assert!(!f("Label['env'] HAS ('eu') AND Label['team'] HAS ('a')").matches(&item, 0));
    }

    #[test]
    fn metadata() {
        let all = Mode::All;
        assert_eq!(parse_metadata(None, &all), Ok(Metadata::default()));
        assert_eq!(
            parse_metadata(Some("$includeMetadata=modification_time;etag"), &all),
            Ok(Metadata { modification_time: true, etag: true })
        );
        assert_eq!(
            parse_metadata(Some("$includeMetadata=etag"), &all),
            Ok(Metadata { modification_time: false, etag: true })
        );
        assert!(parse_metadata(Some("$includeMetadata=owner"), &all).is_err());
        assert!(parse_metadata(Some("$includeMetadata=etag"), &Mode::SelectName).is_err());
    }

    #[test]
    fn modes() {
        assert_eq!(parse(None), Ok(Mode::All));
        assert_eq!(parse(Some("$select=Name")), Ok(Mode::SelectName));
        assert_eq!(
            parse(Some("$page=2&$pageSize=5&$pageCount=true")),
            Ok(Mode::Page(Paging { page: 2, size: 5, page_count: true, entity_count: false }))
        );
        assert_eq!(
            parse(Some("$page=1")),
            Ok(Mode::Page(Paging { page: 1, size: 10, page_count: false, entity_count: false }))
        );
        for bad in [
            "$select=URL",
            "$select=Name&$filter=Name%20in%20('a')",
            "$page=1&$filter=Name%20in%20('a')",
            "$pageSize=5",
            "$page=0",
            "$page=1&$pageSize=1001",
            "$page=1&$pageCount=yes",
            "$page=1&$page=2",
        ] {
            assert!(parse(Some(bad)).is_err(), "{bad}");
        }
    }
}
