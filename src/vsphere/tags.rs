//! vSphere tags, for backup jobs defined by tag (`backup --vm-tag`), as Veeam and Proxmox users define theirs:
//! tag a VM "Backup/gold" in vCenter and the next run backs it up. Tags live in vCenter's vAPI REST endpoint
//! (`/rest/com/vmware/cis/tagging`, vSphere 6.5 and later), not in the SOAP API the rest of the client speaks:
//! a REST session is opened with the same credentials and TLS trust, used for the lookups and closed.

use std::collections::HashMap;

use serde_json::Value;

use super::Client;
use crate::error::{Error, Result};

/// A vAPI REST session, closed on drop.
struct RestSession<'a> {
    client: &'a Client,
    base: String,
    token: String,
}

fn rest_error(call: &str, cause: impl std::fmt::Display) -> Error {
    Error::VSphere { call: format!("REST {call}"), cause: cause.to_string() }
}

impl<'a> RestSession<'a> {
    fn open(client: &'a Client) -> Result<RestSession<'a>> {
        let base = format!("{}/rest", client.url.trim_end_matches("/sdk"));
        let (user, password) = &client.credentials;
        let call = "com/vmware/cis/session";
        let resp = client
            .http
            .post(format!("{base}/{call}"))
            .basic_auth(user, Some(password))
            .send()
            .map_err(|e| rest_error(call, format!("{base}: {e}")))?;
        let value = answer(call, resp)?;
        let token = value.as_str().ok_or_else(|| rest_error(call, format!("no session id in {value}")))?.to_string();
        Ok(RestSession { client, base, token })
    }

    fn call(&self, method: reqwest::Method, call: &str, body: Option<Value>) -> Result<Value> {
        let mut req = self
            .client
            .http
            .request(method, format!("{}/{call}", self.base))
            .header("vmware-api-session-id", &self.token);
        if let Some(body) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(body.to_string());
        }
        answer(call, req.send().map_err(|e| rest_error(call, e))?)
    }

    fn get(&self, call: &str) -> Result<Value> {
        self.call(reqwest::Method::GET, call, None)
    }
}

impl Drop for RestSession<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.call(reqwest::Method::DELETE, "com/vmware/cis/session", None) {
            tracing::debug!("closing the vAPI REST session: {e}");
        }
    }
}

/// The `value` of a vAPI answer; an HTTP error names the call and what the server said.
fn answer(call: &str, resp: reqwest::blocking::Response) -> Result<Value> {
    let status = resp.status();
    let text = resp.text().map_err(|e| rest_error(call, e))?;
    if !status.is_success() {
        let said: String = text.chars().take(300).collect();
        return Err(rest_error(call, format!("HTTP {status}: {said}")));
    }
    if text.is_empty() {
        return Ok(Value::Null);
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| rest_error(call, format!("not JSON ({e})")))?;
    Ok(v.get("value").cloned().unwrap_or(Value::Null))
}

fn field<'v>(v: &'v Value, name: &str, call: &str) -> Result<&'v str> {
    v.get(name).and_then(Value::as_str).ok_or_else(|| rest_error(call, format!("no {name} in {v}")))
}

/// One tag of vCenter.
struct Tag {
    id: String,
    name: String,
    category_id: String,
}

impl RestSession<'_> {
    /// Every tag of vCenter (one request per tag: the list holds ids only).
    fn tags(&self) -> Result<Vec<Tag>> {
        let list = "com/vmware/cis/tagging/tag";
        let ids = self.get(list)?;
        let ids = ids.as_array().ok_or_else(|| rest_error(list, format!("not a list of tags: {ids}")))?;
        let mut tags = Vec::new();
        for id in ids.iter().filter_map(Value::as_str) {
            let call = format!("com/vmware/cis/tagging/tag/id:{id}");
            let t = self.get(&call)?;
            tags.push(Tag {
                id: id.to_string(),
                name: field(&t, "name", &call)?.to_string(),
                category_id: field(&t, "category_id", &call)?.to_string(),
            });
        }
        Ok(tags)
    }

    /// The name of category `id`, fetched once per session.
    fn category_name<'c>(&self, names: &'c mut HashMap<String, String>, id: &str) -> Result<&'c str> {
        if !names.contains_key(id) {
            let call = format!("com/vmware/cis/tagging/category/id:{id}");
            let c = self.get(&call)?;
            names.insert(id.to_string(), field(&c, "name", &call)?.to_string());
        }
        Ok(&names[id])
    }

    /// For each of the tags `ids`, the morefs of the virtual machines it is attached to: one request for all.
    fn vms_of_tags(&self, ids: &[&str]) -> Result<Vec<Vec<String>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let call = "com/vmware/cis/tagging/tag-association?~action=list-attached-objects-on-tags";
        let answer = self.call(reqwest::Method::POST, call, Some(serde_json::json!({ "tag_ids": ids })))?;
        let answer = answer.as_array().map(Vec::as_slice).unwrap_or_default();
        let mut by_tag: HashMap<&str, Vec<String>> = HashMap::new();
        for attached in answer {
            let tag = field(attached, "tag_id", call)?;
            let objects = attached.get("object_ids").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
            by_tag.entry(tag).or_default().extend(
                objects
                    .iter()
                    .filter(|o| o.get("type").and_then(Value::as_str) == Some("VirtualMachine"))
                    .filter_map(|o| o.get("id").and_then(Value::as_str).map(String::from)),
            );
        }
        Ok(ids.iter().map(|id| by_tag.remove(id).unwrap_or_default()).collect())
    }
}

impl Client {
    /// For each of `names`, the morefs of the virtual machines that carry that tag: `TAG`, or `CATEGORY/TAG`
    /// where tags of several categories share the name (refused as ambiguous otherwise). One REST session, and
    /// vCenter's tags are read once for all names, and their VMs asked for in one request.
    pub fn vms_with_tags(&self, names: &[String]) -> Result<Vec<Vec<String>>> {
        let rest = RestSession::open(self)?;
        let tags = rest.tags()?;
        let mut category_names = HashMap::new();
        let mut ids = Vec::new();
        for name in names {
            let (category, tag) = match name.split_once('/') {
                Some((c, t)) => (Some(c), t),
                None => (None, name.as_str()),
            };
            let mut matching = Vec::new();
            for t in tags.iter().filter(|t| t.name == tag) {
                let category_name = rest.category_name(&mut category_names, &t.category_id)?;
                if category.is_none_or(|want| want == category_name) {
                    matching.push((&t.id, category_name.to_string()));
                }
            }
            let id = match matching.as_slice() {
                [(id, _)] => id,
                [] => {
                    let mut known: Vec<&str> = tags.iter().map(|t| t.name.as_str()).collect();
                    known.sort();
                    known.dedup();
                    let known = if known.is_empty() { "vCenter has none".to_string() } else { known.join(", ") };
                    return Err(Error::invalid(format!("no vSphere tag {name:?} (tags: {known})")));
                }
                more => {
                    let categories: Vec<&str> = more.iter().map(|(_, c)| c.as_str()).collect();
                    return Err(Error::invalid(format!(
                        "tags named {tag:?} exist in categories {}: give it as CATEGORY/TAG",
                        categories.join(", ")
                    )));
                }
            };
            ids.push(id.as_str());
        }
        rest.vms_of_tags(&ids)
    }

    /// The tags of every tagged virtual machine, as `CATEGORY/TAG`, sorted, by moref (`vm list --tags`). One REST
    /// session: a request per tag and per category, and one for the VMs of all tags.
    pub fn tags_of_vms(&self) -> Result<HashMap<String, Vec<String>>> {
        let rest = RestSession::open(self)?;
        let tags = rest.tags()?;
        let ids: Vec<&str> = tags.iter().map(|t| t.id.as_str()).collect();
        let mut category_names = HashMap::new();
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for (t, vms) in tags.iter().zip(rest.vms_of_tags(&ids)?) {
            if vms.is_empty() {
                continue;
            }
            let full = format!("{}/{}", rest.category_name(&mut category_names, &t.category_id)?, t.name);
            for vm in vms {
                out.entry(vm).or_default().push(full.clone());
            }
        }
        out.values_mut().for_each(|tags| tags.sort());
        Ok(out)
    }
}
