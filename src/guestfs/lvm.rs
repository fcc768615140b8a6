//! LVM2 logical volumes inside a physical volume (a partition, or a whole disk): the default layout of RHEL,
//! CentOS and many other Linux guests.
//!
//! Read only, from the on-disk format LVM2 documents in `lib/format_text/layout.h`: the label (`LABELONE`, in one
//! of the first four sectors), the PV header after it (the PV's UUID, its data and metadata areas), the metadata
//! area's header (`" LVM2 x[5A%r0N*>"`) and its current metadata, a text in LVM's configuration syntax
//! describing the volume group. Linear logical volumes (one or more segments of type `striped` with one stripe,
//! all on this PV) map to byte ranges of it; others (thin, RAID, striped over several PVs, on other disks) are
//! listed with the reason they are not read. Every field is bounded: this is data the guest wrote.

use super::partitions::ReadAt;
use super::{le32, le64};

/// A logical volume: where its bytes are within the physical volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalVolume {
    pub vg: String,
    pub name: String,
    /// (offset in the LV, offset in the PV, length), in bytes, in LV order.
    pub extents: Vec<(u64, u64, u64)>,
    /// Why its bytes cannot be read from this PV alone, if they cannot.
    pub unreadable: Option<String>,
}

const SECTOR: u64 = 512;
const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
const MAX_METADATA: u64 = 16 << 20;

/// The logical volumes of the volume group whose physical volume starts at byte 0 of `read` (`pv_len` bytes);
/// `Ok(None)` if there is no LVM2 label.
pub fn read_lvs(read: &mut ReadAt, pv_len: u64) -> Result<Option<Vec<LogicalVolume>>, String> {
    if pv_len < 4 * SECTOR {
        return Ok(None);
    }
    let mut head = vec![0u8; 4 * SECTOR as usize];
    read(0, &mut head)?;
    let Some(label) = (0..4)
        .map(|s| s * SECTOR as usize)
        .find(|&s| &head[s..s + 8] == b"LABELONE" && &head[s + 24..s + 32] == b"LVM2 001")
    else {
        return Ok(None);
    };
    // The PV header: at `offset` within the label's sector, and whole within the four sectors read.
    let at = label + le32(&head, label + 20) as usize;
    let pv = head.get(at..).filter(|h| h.len() >= 40 + 2 * 16).ok_or("LVM: the PV header lies outside the label")?;
    let uuid: String = String::from_utf8_lossy(&pv[..32]).into_owned();
    // Data areas, then metadata areas, each a list of (offset, size) ended by a zero offset.
    let mut areas = pv[40..].chunks_exact(16).map(|d| (le64(d, 0), le64(d, 8)));
    areas.by_ref().take_while(|&(offset, _)| offset != 0).for_each(drop);
    let (mda, mda_size) = areas.next().filter(|&(o, _)| o != 0).ok_or("LVM: the PV has no metadata area")?;
    if mda.checked_add(mda_size).is_none_or(|end| end > pv_len) || mda_size < SECTOR {
        return Err(format!("LVM: the metadata area at {mda} ({mda_size} bytes) lies outside the PV"));
    }
    let mut header = [0u8; 512];
    read(mda, &mut header)?;
    if &header[4..20] != MDA_MAGIC {
        return Err("LVM: the metadata area has no LVM2 header".into());
    }
    // The first raw location is the current metadata: a text in the area's circular buffer, which wraps to
    // just after the header.
    let (offset, size) = (le64(&header, 40), le64(&header, 48));
    if size == 0 || size > MAX_METADATA || size > mda_size - SECTOR || offset < SECTOR || offset >= mda_size {
        return Err(format!("LVM: implausible metadata location ({size} bytes at {offset})"));
    }
    let mut text = vec![0u8; size as usize];
    let first = size.min(mda_size - offset) as usize;
    read(mda + offset, &mut text[..first])?;
    if first < text.len() {
        read(mda + SECTOR, &mut text[first..])?;
    }
    let text = String::from_utf8_lossy(&text);
    let config = parse(&text).map_err(|e| format!("LVM metadata: {e}"))?;
    Ok(Some(volume_group(&config, &uuid, pv_len)?))
}

/// A value of LVM's configuration syntax.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Str(String),
    Int(i64),
    List(Vec<Value>),
    Section(Vec<(String, Value)>),
}

impl Value {
    fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Section(items) => items.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn int(&self, key: &str) -> Option<u64> {
        match self.get(key)? {
            Value::Int(n) => u64::try_from(*n).ok(),
            _ => None,
        }
    }
    fn str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    fn sections(&self) -> impl Iterator<Item = (&str, &Value)> {
        let items = match self {
            Value::Section(items) => items.as_slice(),
            _ => &[],
        };
        items.iter().filter(|(_, v)| matches!(v, Value::Section(_))).map(|(k, v)| (k.as_str(), v))
    }
}

/// Sections nest at most this deep (a volume group is four levels: VG, logical_volumes, LV, segment).
const MAX_DEPTH: usize = 16;

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn skip_blank(&mut self) {
        while let Some(&c) = self.s.get(self.at) {
            match c {
                b'#' => {
                    while self.s.get(self.at).is_some_and(|&c| c != b'\n') {
                        self.at += 1;
                    }
                }
                c if c.is_ascii_whitespace() || c == 0 => self.at += 1,
                _ => break,
            }
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_blank();
        self.s.get(self.at).copied()
    }

    fn ident(&mut self) -> Result<String, String> {
        self.skip_blank();
        let start = self.at;
        while self.s.get(self.at).is_some_and(|&c| c.is_ascii_alphanumeric() || b"_.+-".contains(&c)) {
            self.at += 1;
        }
        if start == self.at {
            return Err(format!("a name expected at byte {start}"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.at]).into_owned())
    }

    /// `name = value` and `name { … }` items until `}` (or the end, at the top level).
    fn items(&mut self, depth: usize) -> Result<Vec<(String, Value)>, String> {
        if depth > MAX_DEPTH {
            return Err("sections nest too deep".into());
        }
        let mut items = Vec::new();
        loop {
            match self.peek() {
                None if depth == 0 => return Ok(items),
                None => return Err("a section is not closed".into()),
                Some(b'}') if depth > 0 => {
                    self.at += 1;
                    return Ok(items);
                }
                _ => {}
            }
            let name = self.ident()?;
            match self.peek() {
                Some(b'{') => {
                    self.at += 1;
                    items.push((name, Value::Section(self.items(depth + 1)?)));
                }
                Some(b'=') => {
                    self.at += 1;
                    items.push((name, self.value(depth)?));
                }
                _ => return Err(format!("'=' or '{{' expected after {name:?}")),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        match self.peek() {
            Some(b'"') => {
                self.at += 1;
                let mut out = Vec::new();
                loop {
                    match self.s.get(self.at) {
                        None => return Err("a string is not closed".into()),
                        Some(b'"') => break,
                        Some(b'\\') if self.at + 1 < self.s.len() => {
                            out.push(self.s[self.at + 1]);
                            self.at += 2;
                        }
                        Some(&c) => {
                            out.push(c);
                            self.at += 1;
                        }
                    }
                }
                self.at += 1;
                Ok(Value::Str(String::from_utf8_lossy(&out).into_owned()))
            }
            Some(b'[') => {
                if depth > MAX_DEPTH {
                    return Err("lists nest too deep".into());
                }
                self.at += 1;
                let mut list = Vec::new();
                loop {
                    match self.peek() {
                        Some(b']') => {
                            self.at += 1;
                            return Ok(Value::List(list));
                        }
                        Some(b',') => self.at += 1,
                        None => return Err("a list is not closed".into()),
                        _ => list.push(self.value(depth + 1)?),
                    }
                }
            }
            Some(c) if c == b'-' || c.is_ascii_digit() => {
                let start = self.at;
                self.at += 1;
                while self.s.get(self.at).is_some_and(|c| c.is_ascii_digit()) {
                    self.at += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.at]).expect("ASCII digits");
                // Floats (none in VG metadata) would continue here; a value LVM never writes is refused.
                text.parse().map(Value::Int).map_err(|_| format!("bad number {text:?}"))
            }
            _ => Err(format!("a value expected at byte {}", self.at)),
        }
    }
}

fn parse(text: &str) -> Result<Value, String> {
    Parser { s: text.as_bytes(), at: 0 }.items(0).map(Value::Section)
}

/// The volume group in `config` (the top-level section with physical volumes) and its visible logical volumes,
/// mapped onto the PV whose UUID is `uuid` (32 characters, without dashes).
fn volume_group(config: &Value, uuid: &str, pv_len: u64) -> Result<Vec<LogicalVolume>, String> {
    let (vg_name, vg) =
        config.sections().find(|(_, v)| v.get("physical_volumes").is_some()).ok_or("LVM metadata: no volume group")?;
    let extent = vg.int("extent_size").filter(|&n| n > 0).ok_or("LVM metadata: no extent size")? * SECTOR;
    let pvs = vg.get("physical_volumes").expect("checked above");
    let this_pv = pvs.sections().find(|(_, pv)| pv.str("id").is_some_and(|id| id.replace('-', "") == uuid));
    let Some((pv_name, pv)) = this_pv else {
        return Err(format!("LVM metadata of VG {vg_name}: this PV ({uuid}) is not listed"));
    };
    let pe_start = pv.int("pe_start").ok_or("LVM metadata: no pe_start")? * SECTOR;
    let mut lvs = Vec::new();
    for (name, lv) in vg.get("logical_volumes").map(|l| l.sections().collect()).unwrap_or_else(Vec::new) {
        let visible = matches!(lv.get("status"), Some(Value::List(s)) if s.contains(&Value::Str("VISIBLE".into())));
        if !visible {
            continue;
        }
        let mut out = LogicalVolume { vg: vg_name.into(), name: name.into(), extents: Vec::new(), unreadable: None };
        let segments: Vec<&Value> = lv.sections().map(|(_, s)| s).collect();
        for seg in segments {
            match linear_segment(seg, pv_name, extent, pe_start, pv_len) {
                Ok(e) => out.extents.push(e),
                Err(why) => {
                    out.unreadable = Some(why);
                    out.extents.clear();
                    break;
                }
            }
        }
        out.extents.sort_unstable();
        let mut next = 0;
        for &(lv_off, _, len) in &out.extents {
            if lv_off != next {
                out.unreadable = Some("its segments leave gaps or overlap".into());
                out.extents.clear();
                break;
            }
            next += len;
        }
        lvs.push(out);
    }
    Ok(lvs)
}

/// A segment's bytes: (offset in the LV, offset in the PV, length), or why it cannot be read from this PV.
fn linear_segment(
    seg: &Value,
    pv_name: &str,
    extent: u64,
    pe_start: u64,
    pv_len: u64,
) -> Result<(u64, u64, u64), String> {
    let kind = seg.str("type").unwrap_or("?");
    let stripes = seg.int("stripe_count").unwrap_or(0);
    if kind != "striped" || stripes != 1 {
        return Err(if kind == "striped" { format!("striped over {stripes} PVs") } else { format!("type {kind}") });
    }
    let (Some(start), Some(count)) = (seg.int("start_extent"), seg.int("extent_count")) else {
        return Err("a segment without its extents".into());
    };
    let Some(Value::List(stripe)) = seg.get("stripes") else { return Err("a segment without stripes".into()) };
    let (Some(Value::Str(pv)), Some(Value::Int(pe))) = (stripe.first(), stripe.get(1)) else {
        return Err("a segment's stripe is not (PV, extent)".into());
    };
    if pv != pv_name {
        return Err(format!("on another PV ({pv}): another disk"));
    }
    let bytes = |n: u64| n.checked_mul(extent);
    let (Some(lv_off), Some(pe_off), Some(len)) = (bytes(start), u64::try_from(*pe).ok().and_then(bytes), bytes(count))
    else {
        return Err("extents out of range".into());
    };
    let pv_off = pe_start.checked_add(pe_off).filter(|o| o.checked_add(len).is_some_and(|end| end <= pv_len));
    let pv_off = pv_off.ok_or_else(|| "extents beyond the PV's end".to_string())?;
    Ok((lv_off, pv_off, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: &str = r#"vg0 {
	id = "qRZLVZ-dOb2-d7WC-toSd-ZrJB-28LT-Glpao7"
	seqno = 3
	status = ["RESIZEABLE", "READ", "WRITE"]
	extent_size = 2048		# 1024 Kilobytes
	physical_volumes {
		pv0 {
			id = "vu5Rab-oFu0-OTJk-K6Ry-Ip3A-4v98-QDlvp5"
			device = "/dev/sda2"	# Hint only
			pe_start = 2048
			pe_count = 62
		}
	}
	logical_volumes {
		root {
			status = ["READ", "WRITE", "VISIBLE"]
			segment_count = 1
			segment1 { start_extent = 0
				extent_count = 10 type = "striped" stripe_count = 1
				stripes = [ "pv0", 0 ] }
		}
		home {
			status = ["READ", "WRITE", "VISIBLE"]
			segment1 { start_extent = 0 extent_count = 3 type = "striped" stripe_count = 1 stripes = ["pv0", 20] }
			segment2 { start_extent = 3 extent_count = 2 type = "striped" stripe_count = 1 stripes = ["pv0", 12] }
		}
		pool { status = ["READ", "WRITE", "VISIBLE"] segment1 { start_extent = 0 extent_count = 4 type = "thin-pool" } }
		pool_tdata { status = ["READ", "WRITE"] segment1 { start_extent = 0 extent_count = 4 type = "striped" stripe_count = 1 stripes = ["pv0", 30] } }
	}
}
# Generated by LVM2
contents = "Text Format Volume Group"
"#;

    #[test]
    fn linear_volumes_map_to_the_pv_segment_by_segment_and_others_say_why_not() {
        let config = parse(META).unwrap();
        let lvs = volume_group(&config, "vu5RaboFu0OTJkK6RyIp3A4v98QDlvp5", 64 << 20).unwrap();
        let mib = 1u64 << 20;
        type Mapped<'a> = (&'a str, Vec<(u64, u64, u64)>, Option<&'a str>);
        let got: Vec<Mapped> =
            lvs.iter().map(|l| (l.name.as_str(), l.extents.clone(), l.unreadable.as_deref())).collect();
        assert_eq!(
            got,
            vec![
                ("root", vec![(0, mib, 10 * mib)], None),
                ("home", vec![(0, 21 * mib, 3 * mib), (3 * mib, 13 * mib, 2 * mib)], None),
                ("pool", vec![], Some("type thin-pool")),
            ]
        );
        // The PV's own UUID must be in the metadata, and extents must lie within the PV.
        assert!(volume_group(&config, "someotherpv", 64 << 20).is_err());
        let short = volume_group(&config, "vu5RaboFu0OTJkK6RyIp3A4v98QDlvp5", 8 << 20).unwrap();
        assert_eq!(short[0].unreadable.as_deref(), Some("extents beyond the PV's end"));
    }

    #[test]
    fn broken_metadata_is_an_error_not_a_panic() {
        for bad in ["vg {", "vg { a = [1, 2", "vg { a = \"x", "{", "vg { a = }", &"a { ".repeat(100)] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
