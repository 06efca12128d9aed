//! List query modes (SPEC §1.6): `$filter`, `$select=Name`, and paging with `$page`,
//! `$pageSize`, `$pageCount`, `$entityCount`. The three modes exclude each other; a request
//! that mixes them, or gives a value out of range, is a 400 that names the parameter.

/// Largest `$pageSize` (SPEC §1.6).
pub(crate) const MAX_PAGE_SIZE: usize = 1000;
const DEFAULT_PAGE_SIZE: usize = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Filter {
    In(Vec<String>),
    StartsWith(String),
    EndsWith(String),
}

impl Filter {
    pub(crate) fn matches(&self, name: &str) -> bool {
        match self {
            Filter::In(names) => names.iter().any(|n| n == name),
            Filter::StartsWith(p) => name.starts_with(p.as_str()),
            Filter::EndsWith(s) => name.ends_with(s.as_str()),
        }
    }
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

const FILTER_HELP: &str = "use Name in ('a','b'), startswith(Name,'prefix') or endswith(Name,'suffix'); quote values with ', doubling a ' inside";

/// `Name in ('a','b')`, `startswith(Name,'x')`, `endswith(Name,'x')`.
pub(crate) fn parse_filter(f: &str) -> Result<Filter, String> {
    let bad = || format!("$filter='{f}' is not understood: {FILTER_HELP}");
    let s = f.trim();
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
    if s.starts_with("modifiedwithin") {
        return Err(format!(
            "$filter='{f}': modifiedwithin is not supported by this Destination Service; {FILTER_HELP}"
        ));
    }
    Err(bad())
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
        assert!(parse_filter("modifiedwithin('30', 'minutes')").unwrap_err().contains("not supported"));
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
