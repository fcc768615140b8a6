//! Answers of a vSphere server (or of anything that answers on its URL): SOAP parsing, faults, and what the
//! client reads out of them (VM inventory and devices, changed disk areas). Never a panic, whatever comes.
#![no_main]
use diskvault::vsphere::{self, xml::Element};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for method in ["RetrievePropertiesEx", "QueryChangedDiskAreas"] {
        let Ok(response) = vsphere::parse_response(method, 200, data) else { continue };
        if let Ok((areas, _)) = vsphere::changed_areas_answer(&response, 0) {
            let _ = diskvault::source::changes::validate(&areas, 1 << 40);
        }
        walk(&response);
    }
});

/// Every element as a VM object and as a device list.
fn walk(e: &Element) {
    let _ = vsphere::vm_from_object(e);
    let _ = vsphere::disks_of(e);
    let _ = vsphere::controllers_of(e);
    let _ = vsphere::nics_of(e);
    for c in &e.children {
        walk(c);
    }
}
