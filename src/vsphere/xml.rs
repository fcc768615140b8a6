//! A small namespace-aware XML tree for SOAP answers. Element names are kept as local names plus namespace
//! URI; `xsi:type` is found by the XML Schema instance namespace URI, whatever prefix the server bound to it
//! (vCenter writes `xsi:type`, govmomi's simulator `XMLSchema-instance:type`).

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

pub const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub namespace: Option<String>,
    /// Attributes by local name (namespaced ones as `{uri}name`).
    pub attributes: Vec<(String, String)>,
    pub children: Vec<Element>,
    pub text: String,
}

/// Deepest nesting accepted (SOAP answers are shallow; this bounds hostile input).
const MAX_DEPTH: usize = 64;

impl Element {
    pub fn parse(xml: &[u8]) -> Result<Element, String> {
        let mut reader = NsReader::from_reader(xml);
        reader.config_mut().trim_text(false);
        let mut stack: Vec<Element> = Vec::new();
        let mut root: Option<Element> = None;
        let mut buf = Vec::new();
        loop {
            let (ns, event) = reader.read_resolved_event_into(&mut buf).map_err(|e| format!("XML: {e}"))?;
            let namespace = match ns {
                ResolveResult::Bound(n) => Some(String::from_utf8_lossy(n.as_ref()).into_owned()),
                _ => None,
            };
            match event {
                Event::Start(ref e) | Event::Empty(ref e) => {
                    if root.is_some() {
                        return Err("XML has content after its root element".into());
                    }
                    let mut el = Element {
                        name: String::from_utf8_lossy(e.local_name().as_ref()).into_owned(),
                        namespace,
                        ..Element::default()
                    };
                    for a in e.attributes() {
                        let a = a.map_err(|e| format!("XML attribute: {e}"))?;
                        let (ans, local) = reader.resolve_attribute(a.key);
                        let local = String::from_utf8_lossy(local.as_ref()).into_owned();
                        let key = match ans {
                            ResolveResult::Bound(n) => format!("{{{}}}{local}", String::from_utf8_lossy(n.as_ref())),
                            _ => local,
                        };
                        let value = a.unescape_value().map_err(|e| format!("XML attribute: {e}"))?.into_owned();
                        el.attributes.push((key, value));
                    }
                    if matches!(event, Event::Empty(_)) {
                        match stack.last_mut() {
                            Some(parent) => parent.children.push(el),
                            None => root = Some(el),
                        }
                    } else {
                        if stack.len() >= MAX_DEPTH {
                            return Err("XML nested too deeply".into());
                        }
                        stack.push(el);
                    }
                }
                Event::End(_) => {
                    let el = stack.pop().ok_or("XML end tag without a start")?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(el),
                        None => root = Some(el),
                    }
                }
                Event::Text(t) => {
                    if let Some(top) = stack.last_mut() {
                        top.text.push_str(&t.decode().map_err(|e| format!("XML text: {e}"))?);
                    }
                }
                // Entity and character references arrive as their own events.
                Event::GeneralRef(r) => {
                    if let Some(top) = stack.last_mut() {
                        let resolved = match r.resolve_char_ref().map_err(|e| format!("XML reference: {e}"))? {
                            Some(c) => c,
                            None => match r.decode().map_err(|e| format!("XML reference: {e}"))?.as_ref() {
                                "amp" => '&',
                                "lt" => '<',
                                "gt" => '>',
                                "quot" => '"',
                                "apos" => '\'',
                                other => return Err(format!("XML: unknown entity &{other};")),
                            },
                        };
                        top.text.push(resolved);
                    }
                }
                Event::CData(t) => {
                    if let Some(top) = stack.last_mut() {
                        top.text.push_str(&String::from_utf8_lossy(&t));
                    }
                }
                Event::Eof => break,
                _ => {}
            }
            buf.clear();
        }
        if !stack.is_empty() {
            return Err("XML ends inside an element".into());
        }
        root.ok_or_else(|| "no XML element".into())
    }

    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The text of child `name`, if present.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }

    /// Follows a path of child names.
    pub fn path(&self, names: &[&str]) -> Option<&Element> {
        names.iter().try_fold(self, |e, n| e.child(n))
    }

    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The `xsi:type` attribute without its prefix (`VirtualDisk`), bound by namespace URI.
    pub fn xsi_type(&self) -> Option<&str> {
        let v = self.attribute(&format!("{{{XSI}}}type"))?;
        Some(v.rsplit(':').next().unwrap_or(v))
    }
}
