//! Domain XML: what a backup needs to know of a domain (its disks, firmware variables,
//! network cards, guest agent channel), and the XML of a copy of it for recovery (new
//! name and identity, disks on overlays, no network by default).
//!
//! The XML comes from libvirt or from a snapshot (hostile input as far as parsing goes:
//! a malformed document is an error, never a panic).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use xmltree::{Element, XMLNode};

/// One `<disk>` of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDef {
    /// The guest's name for it (`vda`): the disk's name in snapshots.
    pub target: String,
    /// `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// Where the data is: `file`, `block`, `network`, `volume`, `nvme`, ...
    pub kind: String,
    /// The file or device (file and block disks).
    pub source: Option<PathBuf>,
    /// For network disks: the protocol (`rbd`, `nbd`, `iscsi`, ...).
    pub protocol: Option<String>,
    /// The image format the driver reads (`qcow2`, `raw`).
    pub format: Option<String>,
    pub readonly: bool,
}

impl DiskDef {
    /// Whether a backup includes it: a writable disk (not a CD-ROM or floppy).
    #[must_use]
    pub fn backed_up(&self) -> bool {
        self.device == "disk" || self.device == "lun"
    }
}

/// What a backup needs of a domain's XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDef {
    pub name: String,
    pub uuid: Option<String>,
    pub disks: Vec<DiskDef>,
    /// The UEFI variables file (`<os><nvram>`).
    pub nvram: Option<PathBuf>,
    /// MAC addresses of its network cards.
    pub macs: Vec<String>,
    /// Whether it has the QEMU guest agent's channel.
    pub agent_channel: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("domain XML: {0}")]
pub struct XmlError(String);

fn parse_root(xml: &str) -> Result<Element, XmlError> {
    let root = Element::parse(xml.as_bytes()).map_err(|e| XmlError(e.to_string()))?;
    if root.name != "domain" {
        return Err(XmlError(format!(
            "the root element is <{}>, not <domain>",
            root.name
        )));
    }
    Ok(root)
}

fn children<'e>(e: &'e Element, name: &'e str) -> impl Iterator<Item = &'e Element> + 'e {
    e.children
        .iter()
        .filter_map(XMLNode::as_element)
        .filter(move |c| c.name == name)
}

fn text(e: Option<&Element>) -> Option<String> {
    e.and_then(Element::get_text)
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

/// Parses a domain's XML.
pub fn parse(xml: &str) -> Result<DomainDef, XmlError> {
    let root = parse_root(xml)?;
    let name = text(root.get_child("name")).ok_or_else(|| XmlError("no <name>".into()))?;
    let devices = root.get_child("devices");
    let mut disks = Vec::new();
    for d in devices.into_iter().flat_map(|dev| children(dev, "disk")) {
        let target = d
            .get_child("target")
            .and_then(|t| t.attributes.get("dev"))
            .cloned()
            .ok_or_else(|| XmlError(format!("a disk of {name} has no <target dev>")))?;
        if target.is_empty()
            || target.contains('/')
            || target.starts_with('.')
            || target.contains(',')
        {
            return Err(XmlError(format!(
                "disk target {target:?} of {name} is not a name"
            )));
        }
        let source = d.get_child("source");
        let attr = |k: &str| source.and_then(|s| s.attributes.get(k)).cloned();
        disks.push(DiskDef {
            device: d
                .attributes
                .get("device")
                .cloned()
                .unwrap_or_else(|| "disk".into()),
            kind: d
                .attributes
                .get("type")
                .cloned()
                .unwrap_or_else(|| "file".into()),
            source: attr("file").or_else(|| attr("dev")).map(PathBuf::from),
            protocol: attr("protocol"),
            format: d
                .get_child("driver")
                .and_then(|x| x.attributes.get("type"))
                .cloned(),
            readonly: d.get_child("readonly").is_some(),
            target,
        });
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = disks.iter().find(|d| !seen.insert(d.target.clone())) {
        return Err(XmlError(format!(
            "two disks of {name} are both {:?}",
            dup.target
        )));
    }
    let macs = devices
        .into_iter()
        .flat_map(|dev| children(dev, "interface"))
        .filter_map(|i| {
            i.get_child("mac")
                .and_then(|m| m.attributes.get("address"))
                .cloned()
        })
        .collect();
    let agent_channel = devices
        .into_iter()
        .flat_map(|dev| children(dev, "channel"))
        .any(|c| {
            c.get_child("target")
                .and_then(|t| t.attributes.get("name"))
                .is_some_and(|n| n == "org.qemu.guest_agent.0")
        });
    Ok(DomainDef {
        uuid: text(root.get_child("uuid")),
        nvram: text(root.get_child("os").and_then(|o| o.get_child("nvram"))).map(PathBuf::from),
        disks,
        macs,
        agent_channel,
        name,
    })
}

/// How a recovered copy is networked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// No network card at all: the copy cannot collide with the original.
    None,
    /// Its cards on this libvirt network (an isolated one, for verification).
    Named(String),
    /// One card, on this tap (made beforehand, not managed by libvirt): a verification
    /// lab's. The domain's other cards are left out; a domain without one gets one.
    Tap(String),
}

/// What changes in a copy of a domain started from a snapshot.
#[derive(Debug, Clone)]
pub struct Copy {
    pub name: String,
    /// Disk target -> the file the copy runs on (a qcow2 overlay).
    pub disks: HashMap<String, PathBuf>,
    /// The format of those files: `qcow2` (overlays, converted restores) or `raw`.
    pub disk_format: String,
    /// The copy's own firmware variables file, when the domain had one.
    pub nvram: Option<PathBuf>,
    pub network: Network,
    /// Where the serial console's output goes (the first serial port becomes a file).
    pub console_log: Option<PathBuf>,
}

/// The XML of a copy of the domain `saved` (from a snapshot): a new name and UUID, the
/// disks of `copy.disks` on their overlays (qcow2), other drives emptied, the network as
/// `copy.network` says with new MAC addresses, channels at paths libvirt chooses.
pub fn copy_xml(saved: &str, copy: &Copy) -> Result<String, XmlError> {
    let mut root = parse_root(saved)?;
    set_text(&mut root, "name", &copy.name);
    root.children
        .retain(|c| c.as_element().is_none_or(|e| e.name != "uuid"));
    if let Some(os) = root.get_mut_child("os") {
        match &copy.nvram {
            Some(p) => {
                if let Some(n) = os.get_mut_child("nvram") {
                    n.attributes.remove("template");
                    n.children = vec![XMLNode::Text(p.display().to_string())];
                }
            }
            None => os
                .children
                .retain(|c| c.as_element().is_none_or(|e| e.name != "nvram")),
        }
    }
    let Some(devices) = root.get_mut_child("devices") else {
        return Err(XmlError("no <devices>".into()));
    };
    let mut first_serial = true;
    let mut tapped = false;
    let mut kept = Vec::new();
    for node in std::mem::take(&mut devices.children) {
        let XMLNode::Element(mut e) = node else {
            kept.push(node);
            continue;
        };
        match e.name.as_str() {
            "disk" => {
                let target = e
                    .get_child("target")
                    .and_then(|t| t.attributes.get("dev"))
                    .cloned()
                    .unwrap_or_default();
                match copy.disks.get(&target) {
                    Some(file) => point_disk_at(&mut e, file, &copy.disk_format),
                    // A drive the copy does not get (a CD-ROM): kept, empty.
                    None => {
                        e.children.retain(|c| {
                            c.as_element()
                                .is_none_or(|x| x.name != "source" && x.name != "backingStore")
                        });
                        if e.attributes.get("device").is_some_and(|d| d == "disk") {
                            continue; // a disk without its data: left out
                        }
                        e.attributes.insert("type".into(), "file".into());
                    }
                }
            }
            "interface" => match &copy.network {
                Network::None => continue,
                Network::Named(net) => {
                    e.attributes.insert("type".into(), "network".into());
                    e.children.retain(|c| {
                        c.as_element().is_none_or(|x| {
                            !matches!(x.name.as_str(), "mac" | "source" | "target" | "address")
                        })
                    });
                    let mut src = Element::new("source");
                    src.attributes.insert("network".into(), net.clone());
                    e.children.push(XMLNode::Element(src));
                }
                Network::Tap(tap) => {
                    if tapped {
                        continue;
                    }
                    tapped = true;
                    e = tap_interface(tap, e.get_child("model").cloned());
                }
            },
            "channel" => {
                // libvirt picks the socket path of the copy's channels.
                e.children
                    .retain(|c| c.as_element().is_none_or(|x| x.name != "source"));
            }
            "serial" | "console" if copy.console_log.is_some() => {
                if e.name == "console" || !first_serial {
                    continue;
                }
                first_serial = false;
                e = serial_to_file(copy.console_log.as_deref().unwrap_or(Path::new("")));
            }
            // Host devices are the original's: never handed to a copy.
            "hostdev" | "redirdev" | "smartcard" => continue,
            _ => {}
        }
        // Device addresses stay: the guest sees the same hardware.
        kept.push(XMLNode::Element(e));
    }
    if first_serial {
        if let Some(log) = &copy.console_log {
            kept.push(XMLNode::Element(serial_to_file(log)));
        }
    }
    if let (Network::Tap(tap), false) = (&copy.network, tapped) {
        kept.push(XMLNode::Element(tap_interface(tap, None)));
    }
    devices.children = kept;
    let mut out = Vec::new();
    root.write_with_config(
        &mut out,
        xmltree::EmitterConfig::new()
            .perform_indent(true)
            .write_document_declaration(false),
    )
    .map_err(|e| XmlError(e.to_string()))?;
    String::from_utf8(out).map_err(|e| XmlError(e.to_string()))
}

fn set_text(root: &mut Element, name: &str, value: &str) {
    match root.get_mut_child(name) {
        Some(e) => e.children = vec![XMLNode::Text(value.to_owned())],
        None => {
            let mut e = Element::new(name);
            e.children.push(XMLNode::Text(value.to_owned()));
            root.children.insert(0, XMLNode::Element(e));
        }
    }
}

/// Makes a `<disk>` a file disk on `path`, an image of `format`.
fn point_disk_at(e: &mut Element, path: &Path, format: &str) {
    e.attributes.insert("type".into(), "file".into());
    e.children.retain(|c| {
        c.as_element()
            .is_none_or(|x| !matches!(x.name.as_str(), "source" | "backingStore" | "readonly"))
    });
    let mut src = Element::new("source");
    src.attributes
        .insert("file".into(), path.display().to_string());
    e.children.push(XMLNode::Element(src));
    match e.get_mut_child("driver") {
        Some(d) => {
            d.attributes.insert("type".into(), format.into());
        }
        None => {
            let mut d = Element::new("driver");
            d.attributes.insert("name".into(), "qemu".into());
            d.attributes.insert("type".into(), format.into());
            e.children.push(XMLNode::Element(d));
        }
    }
}

/// A card on the unmanaged tap `tap`, of the original card's model (default virtio).
fn tap_interface(tap: &str, model: Option<Element>) -> Element {
    let mut e = Element::new("interface");
    e.attributes.insert("type".into(), "ethernet".into());
    let mut target = Element::new("target");
    target.attributes.insert("dev".into(), tap.into());
    target.attributes.insert("managed".into(), "no".into());
    e.children.push(XMLNode::Element(target));
    let model = model.unwrap_or_else(|| {
        let mut m = Element::new("model");
        m.attributes.insert("type".into(), "virtio".into());
        m
    });
    e.children.push(XMLNode::Element(model));
    e
}

fn serial_to_file(log: &Path) -> Element {
    let mut s = Element::new("serial");
    s.attributes.insert("type".into(), "file".into());
    let mut src = Element::new("source");
    src.attributes
        .insert("path".into(), log.display().to_string());
    let mut target = Element::new("target");
    target.attributes.insert("port".into(), "0".into());
    s.children.push(XMLNode::Element(src));
    s.children.push(XMLNode::Element(target));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r"<domain type='kvm'>
  <name>mainserver</name>
  <uuid>7d5d3a1e-1b2c-4d5e-8f90-123456789abc</uuid>
  <os><type arch='x86_64'>hvm</type><nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/mainserver_VARS.fd</nvram></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/main.qcow2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='rbd' name='pool/image'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/isos/debian.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:12:34:56'/>
      <source bridge='br0'/>
      <target dev='vnet3'/>
    </interface>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/x/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <hostdev mode='subsystem' type='pci'/>
  </devices>
</domain>";

    #[test]
    fn a_domain_is_read_for_what_a_backup_needs() {
        let d = parse(XML).unwrap();
        assert_eq!(d.name, "mainserver");
        assert_eq!(d.disks.len(), 4);
        assert_eq!(d.disks[0].format.as_deref(), Some("qcow2"));
        assert_eq!(
            d.disks[1].source.as_deref(),
            Some(Path::new("/dev/vg/data"))
        );
        assert_eq!(d.disks[2].protocol.as_deref(), Some("rbd"));
        assert!(!d.disks[3].backed_up() && d.disks[3].readonly);
        assert_eq!(d.macs, ["52:54:00:12:34:56"]);
        assert!(d.agent_channel);
        assert!(d.nvram.is_some());
    }

    #[test]
    fn a_copy_gets_a_new_identity_overlays_and_no_network() {
        let copy = Copy {
            name: "mainserver-recovered".into(),
            disks: [
                ("vda".to_owned(), PathBuf::from("/s/vda.qcow2")),
                ("vdb".to_owned(), PathBuf::from("/s/vdb.qcow2")),
            ]
            .into_iter()
            .collect(),
            disk_format: "qcow2".into(),
            nvram: Some(PathBuf::from("/s/VARS.fd")),
            network: Network::None,
            console_log: Some(PathBuf::from("/s/console.log")),
        };
        let xml = copy_xml(XML, &copy).unwrap();
        let d = parse(&xml).unwrap();
        assert_eq!(d.name, "mainserver-recovered");
        assert_eq!(d.uuid, None);
        assert!(d.macs.is_empty());
        assert!(!xml.contains("hostdev"), "{xml}");
        assert_eq!(d.nvram.as_deref(), Some(Path::new("/s/VARS.fd")));
        let vda = &d.disks[0];
        assert_eq!(
            (
                vda.kind.as_str(),
                vda.source.as_deref(),
                vda.format.as_deref()
            ),
            ("file", Some(Path::new("/s/vda.qcow2")), Some("qcow2"))
        );
        assert_eq!(
            d.disks[1].source.as_deref(),
            Some(Path::new("/s/vdb.qcow2"))
        );
        // The network disk has no data in the copy: left out; the CD-ROM is empty.
        assert_eq!(d.disks.len(), 3);
        assert_eq!(d.disks[2].device, "cdrom");
        assert_eq!(d.disks[2].source, None);
        assert!(!xml.contains("/var/lib/libvirt/qemu/channel"), "{xml}");
        assert!(xml.contains("/s/console.log"));
        // On a named network: the cards stay, with new addresses.
        let on_net = copy_xml(
            XML,
            &Copy {
                network: Network::Named("lab".into()),
                ..copy.clone()
            },
        )
        .unwrap();
        assert!(
            on_net.contains("network=\"lab\"") || on_net.contains("network='lab'"),
            "{on_net}"
        );
        assert!(!on_net.contains("52:54:00:12:34:56"));
        // In a verification lab: one card, on the lab's tap, nothing of the bridge.
        let in_lab = copy_xml(
            XML,
            &Copy {
                network: Network::Tap("cl-abc".into()),
                ..copy.clone()
            },
        )
        .unwrap();
        assert_eq!(in_lab.matches("<interface").count(), 1, "{in_lab}");
        assert!(
            in_lab.contains("cl-abc") && !in_lab.contains("br0"),
            "{in_lab}"
        );
        // A domain without a card gets one there.
        let bare = "<domain><name>x</name><devices></devices></domain>";
        let bare_lab = copy_xml(
            bare,
            &Copy {
                network: Network::Tap("cl-abc".into()),
                ..copy
            },
        )
        .unwrap();
        assert!(bare_lab.contains("type=\"ethernet\""), "{bare_lab}");
        assert!(bare_lab.contains("managed=\"no\""), "{bare_lab}");
    }

    #[test]
    fn malformed_xml_is_an_error() {
        for bad in [
            "",
            "<domain>",
            "<notadomain/>",
            "<domain><devices><disk><target/></disk></devices></domain>",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let dup = "<domain><name>x</name><devices><disk><target dev='vda'/></disk><disk><target dev='vda'/></disk></devices></domain>";
        assert!(parse(dup).unwrap_err().to_string().contains("both"));
        let evil =
            "<domain><name>x</name><devices><disk><target dev='../etc'/></disk></devices></domain>";
        assert!(parse(evil).is_err());
    }
}
