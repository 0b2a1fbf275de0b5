//! The HTTP/1.1 request framing state machine behind [`super::StrictH1`]:
//! pure functions over bytes, no I/O. [`Framer::scan`] examines bytes the
//! reader has not examined yet and says how many of them may be handed to
//! hyper, stopping where it needs more bytes or where it found a violation.

/// The HTTP/2 connection preface's first line.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";
/// A request line hyper rejects with `400` (a control byte as the method).
pub(super) const REJECTED_HEAD: &[u8] = b"\x01 / HTTP/1.1\r\n\r\n";
/// A chunk-size line hyper rejects, failing the body.
pub(super) const REJECTED_CHUNK: &[u8] = b"zz\r\n";
/// Longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4096;

/// Why a head was refused (also the `reason` label of
/// `sluicegate_rejected_total`).
pub type Reason = &'static str;

/// A violation: its reason and the bytes hyper gets instead.
pub(super) type Rejection = (Reason, &'static [u8]);

/// Where the reader is in the byte stream of requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Before or inside a request head.
    Head,
    /// Inside a `Content-Length` body: bytes still to come.
    Body(u64),
    /// At a chunk-size line.
    ChunkSize,
    /// Inside chunk data: bytes still to come.
    ChunkData(u64),
    /// At the CRLF after chunk data.
    ChunkEnd,
    /// In the trailer section; bytes seen so far.
    Trailers(usize),
    /// HTTP/2, or after an upgrade: no longer HTTP/1 framing.
    Passthrough,
    /// A violation was found: nothing more is read.
    Rejected,
}

/// How the body of a checked head is framed.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    Upgrade,
}

/// One step of the scan.
enum Step {
    /// This many bytes are checked (0: only the state moved on).
    Advance(usize),
    /// More bytes are needed to decide.
    Wait,
    /// A violation.
    Reject(Rejection),
}

/// The framing state of one client connection.
pub(super) struct Framer {
    pub(super) state: State,
    max_head: usize,
    max_headers: usize,
}

impl Framer {
    pub(super) fn new(max_head: usize, max_headers: usize) -> Framer {
        Framer {
            state: State::Head,
            max_head,
            max_headers,
        }
    }

    /// Examine `data`, bytes not examined yet: how many of them (a prefix)
    /// are checked and may go to hyper, and the violation found right after
    /// them, if any. The rest waits for more bytes.
    pub(super) fn scan(&mut self, data: &[u8]) -> (usize, Option<Rejection>) {
        let mut pos = 0;
        loop {
            let rest = &data[pos..];
            let step = match self.state {
                State::Head => self.step_head(rest),
                State::Body(left) => self.counted(left, rest, State::Head, State::Body),
                State::ChunkSize => self.step_chunk_size(rest),
                State::ChunkData(left) => {
                    self.counted(left, rest, State::ChunkEnd, State::ChunkData)
                }
                State::ChunkEnd => {
                    if rest.len() < 2 {
                        Step::Wait
                    } else if &rest[..2] == b"\r\n" {
                        self.state = State::ChunkSize;
                        Step::Advance(2)
                    } else {
                        Step::Reject(("bad_chunk_end", REJECTED_CHUNK))
                    }
                }
                State::Trailers(seen) => self.step_trailer(rest, seen),
                State::Passthrough => advance_or_wait(rest.len()),
                State::Rejected => Step::Wait,
            };
            match step {
                Step::Advance(n) => {
                    pos += n;
                    if pos == data.len() {
                        return (pos, None);
                    }
                }
                Step::Wait => return (pos, None),
                Step::Reject(rejection) => {
                    self.state = State::Rejected;
                    return (pos, Some(rejection));
                }
            }
        }
    }

    /// `left` bytes of a body or chunk still to come: take what `rest`
    /// has of them; then `done`, or `more` with what is still to come.
    fn counted(&mut self, left: u64, rest: &[u8], done: State, more: fn(u64) -> State) -> Step {
        let n = left.min(rest.len() as u64);
        self.state = if left == n { done } else { more(left - n) };
        advance_or_wait(n as usize)
    }

    fn step_head(&mut self, rest: &[u8]) -> Step {
        // Empty lines before a request line are allowed (RFC 9112 §2.2).
        let blank = rest
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        if blank > 0 {
            return Step::Advance(blank);
        }
        if rest.is_empty() {
            return Step::Wait;
        }
        let n = rest.len().min(H2_PREFACE.len());
        if rest[..n] == H2_PREFACE[..n] {
            if n == H2_PREFACE.len() {
                self.state = State::Passthrough;
                return Step::Advance(0);
            }
            return Step::Wait;
        }
        let Some(end) = head_end(rest) else {
            if rest.len() > self.max_head {
                // hyper answers 431 and closes.
                self.state = State::Passthrough;
                return Step::Advance(0);
            }
            return Step::Wait;
        };
        match check_head(&rest[..end], self.max_headers) {
            Ok(framing) => {
                self.state = match framing {
                    Framing::None | Framing::Length(0) => State::Head,
                    Framing::Length(n) => State::Body(n),
                    Framing::Chunked => State::ChunkSize,
                    Framing::Upgrade => State::Passthrough,
                };
                Step::Advance(end)
            }
            Err(None) => {
                // Past hyper's header count: it answers 431 itself.
                self.state = State::Passthrough;
                Step::Advance(0)
            }
            Err(Some(reason)) => Step::Reject((reason, REJECTED_HEAD)),
        }
    }

    fn step_chunk_size(&mut self, rest: &[u8]) -> Step {
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            if rest.len() > MAX_CHUNK_LINE {
                return Step::Reject(("bad_chunk_size", REJECTED_CHUNK));
            }
            return Step::Wait;
        };
        match chunk_size(&rest[..=nl]) {
            Some(size) => {
                self.state = if size == 0 {
                    State::Trailers(0)
                } else {
                    State::ChunkData(size)
                };
                Step::Advance(nl + 1)
            }
            None => Step::Reject(("bad_chunk_size", REJECTED_CHUNK)),
        }
    }

    fn step_trailer(&mut self, rest: &[u8], seen: usize) -> Step {
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            if seen + rest.len() > self.max_head {
                return Step::Reject(("bad_trailer", REJECTED_CHUNK));
            }
            return Step::Wait;
        };
        let line = &rest[..=nl];
        let ok = nl >= 1
            && line[nl - 1] == b'\r'
            && !line[..nl - 1].contains(&b'\r')
            && (nl == 1 || check_field_line(&line[..nl - 1]).is_ok());
        if !ok || seen + nl + 1 > self.max_head {
            return Step::Reject(("bad_trailer", REJECTED_CHUNK));
        }
        self.state = if nl == 1 {
            State::Head
        } else {
            State::Trailers(seen + nl + 1)
        };
        Step::Advance(nl + 1)
    }
}

fn advance_or_wait(n: usize) -> Step {
    if n == 0 {
        Step::Wait
    } else {
        Step::Advance(n)
    }
}

/// The length of the head (through its blank line), by either line ending,
/// so a head ended with bare LFs is found and refused.
fn head_end(buf: &[u8]) -> Option<usize> {
    for nl in memchr::memchr_iter(b'\n', buf) {
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            Some(_) => {}
            None => return None,
        }
    }
    None
}

/// A 256-entry table of the bytes `c` for which `$pick` holds, built at
/// compile time: the scan does one load per byte instead of a chain of
/// comparisons.
macro_rules! byte_table {
    (|$c:ident| $pick:expr) => {{
        let mut table = [false; 256];
        let mut b = 0;
        while b < 256 {
            let $c = b as u8;
            table[b] = $pick;
            b += 1;
        }
        table
    }};
}

/// Token characters (RFC 9110 §5.6.2).
const TCHAR: [bool; 256] = byte_table!(|c| c.is_ascii_alphanumeric()
    || matches!(
        c,
        b'!' | b'#'
            | b'$'
            | b'%'
            | b'&'
            | b'\''
            | b'*'
            | b'+'
            | b'-'
            | b'.'
            | b'^'
            | b'_'
            | b'`'
            | b'|'
            | b'~'
    ));

/// Bytes a field value may not hold: controls other than HTAB, and DEL.
const BAD_IN_VALUE: [bool; 256] = byte_table!(|c| (c < 0x20 && c != b'\t') || c == 0x7f);

/// Is `b` a token character?
fn tchar(b: u8) -> bool {
    TCHAR[b as usize]
}

/// A field line `name: value` (without its CRLF).
fn check_field_line(line: &[u8]) -> Result<(&[u8], &[u8]), Reason> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err("obs_fold");
    }
    // Names are short: a plain search beats memchr's setup.
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or("bad_header_name")?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|&b| tchar(b)) {
        return Err("bad_header_name");
    }
    let value = trim_ows(&line[colon + 1..]);
    if value.iter().any(|&b| BAD_IN_VALUE[b as usize]) {
        return Err("bad_header_value");
    }
    Ok((name, value))
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Check one whole head; its body framing. `Err(None)`: too many header
/// fields (hyper's `431`); `Err(Some(reason))`: refuse with `400`.
fn check_head(head: &[u8], max_headers: usize) -> Result<Framing, Option<Reason>> {
    // A bare CR or LF or a NUL is refused under its own name, before any
    // other fault: so any refusal first looks for one (`line_ending_fault`).
    // The usual head has none, and need not be scanned for them apart from
    // its lines: every byte of a line is checked below against a set that
    // excludes CR, LF and NUL, and every line must end with CRLF.
    check_lines(head, max_headers).map_err(|e| line_ending_fault(head).map(Some).unwrap_or(e))
}

/// The first bare CR, bare LF or NUL in `head`, if any.
fn line_ending_fault(head: &[u8]) -> Option<Reason> {
    for i in memchr::memchr3_iter(b'\r', b'\n', 0, head) {
        match head[i] {
            b'\r' if head.get(i + 1) != Some(&b'\n') => return Some("bare_cr"),
            b'\n' if i == 0 || head[i - 1] != b'\r' => return Some("bare_lf"),
            0 => return Some("nul_byte"),
            _ => {}
        }
    }
    None
}

/// [`check_head`] line by line: a line not ended by CRLF, or holding a CR,
/// LF or NUL anywhere, is refused (by one of the checks below).
fn check_lines(head: &[u8], max_headers: usize) -> Result<Framing, Option<Reason>> {
    // Drop the final blank line: every line left ends with CRLF.
    if !head.ends_with(b"\r\n\r\n") {
        return Err(Some("bad_line_ending"));
    }
    let body = &head[..head.len() - 2];
    let mut start = 0;
    let mut lines = memchr::memchr_iter(b'\n', body).map(|end| {
        let line = &body[start..end];
        start = end + 1;
        line.strip_suffix(b"\r").ok_or(Some("bad_line_ending"))
    });
    let request_line = lines.next().ok_or(Some("bad_request_line"))??;
    let (method, http10) = check_request_line(request_line).map_err(Some)?;
    let (mut lengths, mut encodings, mut hosts, mut count) = (Vec::new(), 0usize, 0usize, 0usize);
    let (mut chunked, mut upgrade, mut conn_upgrade) = (false, false, false);
    for line in lines {
        let (name, value) = check_field_line(line?).map_err(Some)?;
        count += 1;
        if count > max_headers {
            return Err(None);
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths.push(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            encodings += 1;
            chunked = value.eq_ignore_ascii_case(b"chunked");
            if !chunked {
                return Err(Some("unsupported_transfer_encoding"));
            }
        } else if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            conn_upgrade |= value
                .split(|&b| b == b',')
                .any(|t| trim_ows(t).eq_ignore_ascii_case(b"upgrade"));
        }
    }
    if hosts > 1 {
        return Err(Some("duplicate_host"));
    }
    if encodings > 1 {
        return Err(Some("duplicate_transfer_encoding"));
    }
    if encodings > 0 && http10 {
        return Err(Some("transfer_encoding_in_http10"));
    }
    if encodings > 0 && !lengths.is_empty() {
        return Err(Some("content_length_with_transfer_encoding"));
    }
    if lengths.len() > 1 {
        return Err(Some("duplicate_content_length"));
    }
    let length = match lengths.first() {
        Some(v) => Some(parse_length(v).ok_or(Some("bad_content_length"))?),
        None => None,
    };
    if method == b"CONNECT" || (upgrade && conn_upgrade) {
        return Ok(Framing::Upgrade);
    }
    Ok(match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::None,
    })
}

/// `METHOD SP target SP HTTP/1.x`, single spaces; the method, and whether
/// it is HTTP/1.0.
fn check_request_line(line: &[u8]) -> Result<(&[u8], bool), Reason> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("bad_request_line");
    };
    if method.is_empty() || !method.iter().all(|&b| tchar(b)) {
        return Err("bad_method");
    }
    if target.is_empty() || target.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err("bad_request_target");
    }
    match version {
        b"HTTP/1.1" => Ok((method, false)),
        b"HTTP/1.0" => Ok((method, true)),
        _ => Err("bad_http_version"),
    }
}

/// `1*DIGIT`, no sign, no list, no overflow.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A chunk-size line through its LF: `1*HEXDIG [ext] CRLF`; the size.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r\n")?;
    if line.contains(&b'\r') || line.contains(&b'\n') {
        return None;
    }
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let rest = trim_ows(&line[digits..]);
    if !rest.is_empty() && rest[0] != b';' {
        return None;
    }
    if rest.iter().any(|&b| BAD_IN_VALUE[b as usize]) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(head: &[u8]) -> Result<Framing, Option<Reason>> {
        check_head(head, 100)
    }

    #[test]
    fn good_heads_pass_with_their_framing() {
        assert_eq!(
            framing(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Framing::None)
        );
        assert_eq!(
            framing(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n"),
            Ok(Framing::Length(12))
        );
        assert_eq!(
            framing(b"POST /x HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            framing(b"GET /ws HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"),
            Ok(Framing::Upgrade)
        );
    }

    #[test]
    fn ambiguous_heads_are_refused() {
        let cases: &[(&[u8], Reason)] = &[
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "content_length_with_transfer_encoding"),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", "duplicate_content_length"),
            (b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n", "bad_content_length"),
            (b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n", "bad_content_length"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported_transfer_encoding"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", "duplicate_transfer_encoding"),
            (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", "obs_fold"),
            (b"GET / HTTP/1.1\nHost: a\r\n\r\n", "bare_lf"),
            (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", "bare_cr"),
            (b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n", "bad_header_name"),
            (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", "bad_header_name"),
            (b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n", "bad_header_value"),
            (b"GET  / HTTP/1.1\r\n\r\n", "bad_request_line"),
            (b"GET / HTTP/1.2\r\n\r\n", "bad_http_version"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "duplicate_host"),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "transfer_encoding_in_http10"),
        ];
        for (head, reason) in cases {
            assert_eq!(
                framing(head),
                Err(Some(*reason)),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        assert_eq!(
            check_head(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n", 1),
            Err(None)
        );
    }

    /// `check_head` names a bare CR, bare LF or NUL only when the line
    /// checks refuse the head; so every head holding one must be refused by
    /// them. Tried with each of those bytes put in, and put over, every
    /// position of heads of each framing.
    #[test]
    fn every_line_ending_fault_is_refused_by_the_line_checks() {
        let heads: &[&[u8]] = &[
            b"GET /a?b=c HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n",
            b"POST /x HTTP/1.0\r\nHost: a\r\nContent-Length: 12\r\n\r\n",
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nX:  v \t\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\n\r\n",
        ];
        let mut tried = 0;
        for head in heads {
            assert!(check_head(head, 100).is_ok());
            for i in 0..head.len() {
                for b in [b'\r', b'\n', 0] {
                    let mut inserted = head.to_vec();
                    inserted.insert(i, b);
                    let mut replaced = head.to_vec();
                    replaced[i] = b;
                    for h in [inserted, replaced] {
                        if let Some(reason) = line_ending_fault(&h) {
                            tried += 1;
                            assert!(
                                check_lines(&h, 100).is_err(),
                                "{:?}",
                                String::from_utf8_lossy(&h)
                            );
                            assert_eq!(check_head(&h, 100), Err(Some(reason)));
                        }
                    }
                }
            }
        }
        assert!(tried > 500, "{tried}");
    }

    #[test]
    fn head_end_finds_either_line_ending() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nrest"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
    }

    #[test]
    fn chunk_lines() {
        assert_eq!(chunk_size(b"1a\r\n"), Some(26));
        assert_eq!(chunk_size(b"0;ext=1\r\n"), Some(0));
        assert_eq!(chunk_size(b"ff ; x\r\n"), Some(255));
        assert_eq!(chunk_size(b"-1\r\n"), None);
        assert_eq!(chunk_size(b"1 2\r\n"), None);
        assert_eq!(chunk_size(b"1a\n"), None);
        assert_eq!(chunk_size(b"fffffffffffffffff\r\n"), None);
        assert_eq!(chunk_size(b"0x10\r\n"), None);
    }
}
