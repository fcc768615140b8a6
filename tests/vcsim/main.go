// A TEST-ONLY vSphere: govmomi's vCenter simulator (Debian's golang-github-vmware-govmomi-dev 0.24.2) with
// Changed Block Tracking added from this main package, without patching govmomi (../shared/VMWARE.md §1):
//
//   - every VM disk gets a sparse flat file of its capacity: <datastore dir>/<vm>/<disk>-flat.vmdk, which a test
//     writes into to play the guest; VCSIM_DISKS disks per VM, of VCSIM_DISK_MB, those in VCSIM_INDEPENDENT_DISKS
//     (numbers from 2) independent, those in VCSIM_THICK_EAGER_DISKS thick and eagerly zeroed;
//   - a snapshot freezes each disk (<flat>@<snapshot moref>, the file the test VDDK reads for that snapshot),
//     hashes it per 64 KiB, and records changeId "<uuid>/<n>" on the snapshot's copy of the disk backing and on
//     the VM's when change tracking is on; turning tracking off and on again gives a new uuid (a CBT reset);
//   - QueryChangedDiskAreas is answered from the hashes ("*" = non-zero areas), paged at 16 MiB windows so that
//     clients must loop on startOffset, with FileFault where vCenter gives one; without a snapshot, for a
//     powered-off VM, against the disk as it is now (hashed then);
//   - a VM powered on "boots" if its first disk has a boot sector: VMware Tools then run and its heartbeat is
//     green (guestRuns), as a guest system would report;
//   - vSphere tags (govmomi's vAPI simulator at /rest): VCSIM_TAGS="Category/tag=VM,VM;Category/other=" creates
//     the categories and tags and attaches them to those VMs;
//
// Started by tests/common/vsphere.rs on 127.0.0.1:0 with TLS; prints one JSON line with the URL, credentials,
// certificate thumbprints and datastore directories, then serves until killed.
package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/url"
	"time"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/google/uuid"
	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/simulator"
	_ "github.com/vmware/govmomi/vapi/simulator"
	"github.com/vmware/govmomi/vapi/rest"
	"github.com/vmware/govmomi/vapi/tags"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

const granule = 64 << 10
const pageWindow = 16 << 20

// One disk's tracking state.
type diskState struct {
	uuid   string
	states map[int][][32]byte // seq -> per-granule hashes at that snapshot
	seq    int
	size   int64
}

type tracker struct {
	mu sync.Mutex
	// "vm-42/2000" -> state
	disks map[string]*diskState
	// snapshot moref -> vm moref / device key -> seq
	snapSeq   map[string]map[int32]int
	snapVM    map[string]string
	snapFiles map[string][]string
	// vm moref -> tracking enabled at the last snapshot
	lastEnabled map[string]bool
	datastores  map[string]string
	// "vm-42/2000" -> the disk's flat file
	flats map[string]string
}

// droppedRanges reads <flat>.cbt-drop ("offset length" per line): byte ranges whose changes this CBT "loses",
// as real CBT bugs have (KB2090639, KB2136854), so that tests can check that diskvault's verification notices.
func droppedRanges(flat string) [][2]int64 {
	data, err := os.ReadFile(flat + ".cbt-drop")
	if err != nil {
		return nil
	}
	var out [][2]int64
	for _, line := range strings.Split(string(data), "\n") {
		var off, n int64
		if _, err := fmt.Sscanf(line, "%d %d", &off, &n); err == nil {
			out = append(out, [2]int64{off, off + n})
		}
	}
	return out
}

func (t *tracker) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "CBTTracker", Value: "cbt-tracker"}
}

// UpdateObject sees every property change: a VM powered on or off boots or stops its guest (guestRuns).
func (t *tracker) UpdateObject(obj mo.Reference, changes []types.PropertyChange) {
	m, ok := obj.(*mo.VirtualMachine)
	if !ok {
		return
	}
	for _, c := range changes {
		if c.Name == "runtime.powerState" {
			go t.guestRuns(m.Self, fmt.Sprint(c.Val) == string(types.VirtualMachinePowerStatePoweredOn))
		}
	}
}

// guestRuns plays the guest system of a VM just powered on or off: 200 ms after power-on, a VM whose first
// disk holds a boot sector (0x55 0xAA at byte 510) reports VMware Tools running, a green heartbeat and an IP
// address; one without, or powered off, reports none of them. So a boot check of a restored VM depends on the restored bytes.
func (t *tracker) guestRuns(ref types.ManagedObjectReference, on bool) {
	time.Sleep(200 * time.Millisecond)
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	boots := false
	if on {
		var disk string
		simulator.Map.WithLock(vm, func() {
			for _, d := range vm.Config.Hardware.Device {
				if vd, ok := d.(*types.VirtualDisk); ok {
					if b, ok := vd.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok && disk == "" {
						disk = b.FileName
					}
				}
			}
		})
		if f, err := os.Open(t.flatPath(disk)); err == nil {
			sig := make([]byte, 2)
			if _, err := f.ReadAt(sig, 510); err == nil && sig[0] == 0x55 && sig[1] == 0xAA {
				boots = true
			}
			f.Close()
		}
	}
	tools, beat, ip := "guestToolsNotRunning", types.ManagedEntityStatusGray, ""
	if boots {
		// An address of TEST-NET-1 (RFC 5737) per VM.
		n, _ := strconv.Atoi(strings.TrimPrefix(ref.Value, "vm-"))
		tools, beat, ip = "guestToolsRunning", types.ManagedEntityStatusGreen, fmt.Sprintf("192.0.2.%d", n%250+1)
	}
	simulator.Map.WithLock(vm, func() {
		simulator.Map.Update(vm, []types.PropertyChange{
			{Name: "guest.toolsRunningStatus", Val: tools},
			{Name: "guestHeartbeatStatus", Val: beat},
			{Name: "guest.ipAddress", Val: ip},
		})
	})
}

// flatPath maps "[ds] dir/name.vmdk" to the local flat file.
func (t *tracker) flatPath(fileName string) string {
	end := strings.Index(fileName, "]")
	if !strings.HasPrefix(fileName, "[") || end < 0 {
		return ""
	}
	dir := t.datastores[fileName[1:end]]
	rel := strings.TrimSpace(fileName[end+1:])
	return dir + "/" + strings.TrimSuffix(rel, ".vmdk") + "-flat.vmdk"
}

func hashFile(path string, size int64) ([][32]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	n := (size + granule - 1) / granule
	out := make([][32]byte, n)
	buf := make([]byte, granule)
	zero := sha256.Sum256(make([]byte, granule))
	data := nextData(f, 0, size)
	for i := int64(0); i < n; i++ {
		// Whole granules in a hole are zeros: multi-GiB thin disks are hashed without reading their holes.
		if (i+1)*granule <= data && (i+1)*granule <= size {
			out[i] = zero
			continue
		}
		k, err := f.ReadAt(buf, i*granule)
		if err != nil && err != io.EOF {
			return nil, err
		}
		out[i] = sha256.Sum256(buf[:k])
		data = nextData(f, (i+1)*granule, size)
	}
	return out, nil
}

// nextData is where the first data at or after off lies in f (SEEK_DATA), or size if none.
func nextData(f *os.File, off, size int64) int64 {
	if off >= size {
		return size
	}
	d, err := f.Seek(off, 3)
	if err != nil || d > size {
		return size
	}
	return d
}

// copySparse copies src to dst, leaving all-zero granules as holes.
func copySparse(src, dst string, size int64) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := out.Truncate(size); err != nil {
		return err
	}
	buf := make([]byte, granule)
	zero := make([]byte, granule)
	data := nextData(in, 0, size)
	for off := int64(0); off < size; off += granule {
		if off+granule <= data {
			continue
		}
		data = nextData(in, off+granule, size)
		k, err := in.ReadAt(buf, off)
		if err != nil && err != io.EOF {
			return err
		}
		if k > 0 && !bytes.Equal(buf[:k], zero[:k]) {
			if _, err := out.WriteAt(buf[:k], off); err != nil {
				return err
			}
		}
	}
	return nil
}

func (t *tracker) PutObject(obj mo.Reference) {
	snap, ok := obj.(*simulator.VirtualMachineSnapshot)
	if !ok {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	vm := simulator.Map.Get(snap.Vm).(*simulator.VirtualMachine)
	vmRef := snap.Vm.Value
	enabled := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	wasEnabled := t.lastEnabled[vmRef]
	t.lastEnabled[vmRef] = enabled
	sref := snap.Self.Value
	t.snapSeq[sref] = map[int32]int{}
	t.snapVM[sref] = vmRef
	// The snapshot shares device pointers with the VM: give it its own copies before changing backings.
	devices := make([]types.BaseVirtualDevice, len(snap.Config.Hardware.Device))
	for i, d := range snap.Config.Hardware.Device {
		devices[i] = d
		disk, ok := d.(*types.VirtualDisk)
		if !ok {
			continue
		}
		backing, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		// As on ESXi, a snapshot leaves independent disks out: nothing to read them from.
		if strings.HasPrefix(backing.DiskMode, "independent") {
			continue
		}
		flat := t.flatPath(backing.FileName)
		frozen := flat + "@" + sref
		size := disk.CapacityInBytes
		if size == 0 {
			size = disk.CapacityInKB * 1024
		}
		if err := copySparse(flat, frozen, size); err != nil {
			fmt.Fprintf(os.Stderr, "vcsim-cbt: freezing %s: %v\n", flat, err)
			continue
		}
		t.snapFiles[sref] = append(t.snapFiles[sref], frozen)
		key := fmt.Sprintf("%s/%d", vmRef, disk.Key)
		t.flats[key] = flat
		st := t.disks[key]
		changeID := ""
		if enabled {
			if st == nil || !wasEnabled {
				st = &diskState{uuid: uuid.New().String(), states: map[int][][32]byte{}, size: size}
				t.disks[key] = st
			}
			// A grown disk keeps its changeId UUID, as on ESXi: the new space counts as changed.
			st.size = size
			hashes, err := hashFile(frozen, size)
			if err != nil {
				fmt.Fprintf(os.Stderr, "vcsim-cbt: hashing %s: %v\n", frozen, err)
				continue
			}
			st.seq++
			st.states[st.seq] = hashes
			t.snapSeq[sref][disk.Key] = st.seq
			changeID = fmt.Sprintf("%s/%d", st.uuid, st.seq)
		} else {
			delete(t.disks, key)
		}
		bcopy := *backing
		bcopy.ChangeId = changeID
		dcopy := *disk
		dcopy.Backing = &bcopy
		devices[i] = &dcopy
		// The VM's own backing shows the latest changeId too, as vCenter does.
		backing.ChangeId = changeID
	}
	hw := snap.Config.Hardware
	hw.Device = devices
	snap.Config.Hardware = hw
}

func (t *tracker) RemoveObject(ref types.ManagedObjectReference) {
	if ref.Type != "VirtualMachineSnapshot" {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, f := range t.snapFiles[ref.Value] {
		os.Remove(f)
	}
	delete(t.snapFiles, ref.Value)
}

type qcdaRequest struct {
	This        string `xml:"_this"`
	Snapshot    string `xml:"snapshot"`
	DeviceKey   int32  `xml:"deviceKey"`
	StartOffset int64  `xml:"startOffset"`
	ChangeID    string `xml:"changeId"`
}

func fault(w http.ResponseWriter, kind, msg string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	var esc bytes.Buffer
	xml.EscapeText(&esc, []byte(msg))
	fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>%s</faultstring><detail><%sFault xmlns="urn:vim25" xsi:type="%s"></%sFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>`,
		esc.String(), kind, kind, kind)
}

func (t *tracker) queryChangedDiskAreas(w http.ResponseWriter, body []byte) {
	var env struct {
		Body struct {
			Req qcdaRequest `xml:"QueryChangedDiskAreas"`
		} `xml:"Body"`
	}
	if err := xml.Unmarshal(body, &env); err != nil {
		fault(w, "InvalidArgument", "cannot parse QueryChangedDiskAreas: "+err.Error())
		return
	}
	r := env.Body.Req
	// Without a snapshot, changes up to the disk as it is now: vCenter answers that for a powered-off VM only.
	// (The VM is looked up before the tracker's lock: the simulator calls PutObject holding its own.)
	var vm *simulator.VirtualMachine
	if r.Snapshot == "" {
		obj := simulator.Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: r.This})
		var ok bool
		if vm, ok = obj.(*simulator.VirtualMachine); !ok {
			fault(w, "InvalidArgument", fmt.Sprintf("no VM %q", r.This))
			return
		}
		if vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
			fault(w, "InvalidState", "changes up to the current state need a snapshot while the VM is powered on")
			return
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	key := fmt.Sprintf("%s/%d", r.This, r.DeviceKey)
	st := t.disks[key]
	var current [][32]byte
	if vm != nil {
		enabled := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
		if st == nil || !enabled || t.flats[key] == "" {
			fault(w, "FileFault", "Change tracking is not active on this disk")
			return
		}
		hashes, err := hashFile(t.flats[key], st.size)
		if err != nil {
			fault(w, "FileFault", "reading the disk: "+err.Error())
			return
		}
		current = hashes
	} else {
		if t.snapVM[r.Snapshot] != r.This {
			fault(w, "InvalidArgument", fmt.Sprintf("snapshot %q is not a snapshot of %q", r.Snapshot, r.This))
			return
		}
		seq, ok := t.snapSeq[r.Snapshot][r.DeviceKey]
		if st == nil || !ok {
			fault(w, "FileFault", "Change tracking is not active on this disk at this snapshot")
			return
		}
		current = st.states[seq]
	}
	var base [][32]byte
	if r.ChangeID != "*" {
		parts := strings.SplitN(r.ChangeID, "/", 2)
		n, err := strconv.Atoi(parts[len(parts)-1])
		if len(parts) != 2 || err != nil || parts[0] != st.uuid || st.states[n] == nil {
			fault(w, "FileFault", fmt.Sprintf("Error caused by file: change id %q is not valid for this disk", r.ChangeID))
			return
		}
		base = st.states[n]
	}
	if r.StartOffset < 0 || r.StartOffset >= st.size {
		fault(w, "InvalidArgument", fmt.Sprintf("startOffset %d is outside the disk", r.StartOffset))
		return
	}
	zero := sha256.Sum256(make([]byte, granule))
	dropped := droppedRanges(t.flats[key])
	end := r.StartOffset + pageWindow
	if end > st.size {
		end = st.size
	}
	var areas strings.Builder
	var runStart, runEnd int64 = -1, -1
	flush := func() {
		if runStart >= 0 {
			fmt.Fprintf(&areas, "<changedArea><start>%d</start><length>%d</length></changedArea>", runStart, runEnd-runStart)
		}
		runStart = -1
	}
	for g := r.StartOffset / granule; g*granule < end; g++ {
		var changed bool
		if base == nil {
			// "*": the allocated areas; here, the granules that are not all zeros.
			z := zero
			if tail := st.size - g*granule; tail < granule {
				z = sha256.Sum256(make([]byte, tail))
			}
			changed = current[g] != z
		} else {
			changed = g >= int64(len(base)) || current[g] != base[g]
			for _, d := range dropped {
				if g*granule < d[1] && (g+1)*granule > d[0] {
					changed = false
				}
			}
		}
		if !changed {
			flush()
			continue
		}
		s, e := g*granule, (g+1)*granule
		if e > st.size {
			e = st.size
		}
		if runStart < 0 {
			runStart = s
		}
		runEnd = e
	}
	flush()
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval><startOffset>%d</startOffset><length>%d</length>%s</returnval></QueryChangedDiskAreasResponse></soapenv:Body></soapenv:Envelope>`,
		r.StartOffset, end-r.StartOffset, areas.String())
}

func main() {
	model := simulator.VPX()
	model.Datacenter = 1
	model.Cluster = 0
	model.Host = 1
	model.Machine = 2
	if err := model.Create(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Our own CA and server certificate (vcsim's built-in test certificate has a key too short for rustls).
	caPEM, serverCert := makeCertificates()
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{serverCert}}
	// The vAPI REST endpoint (/rest: tags), which govmomi registers only when asked.
	model.Service.RegisterEndpoints = true
	// A real password check (vcsim accepts any password for its default user).
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword("administrator@vsphere.local", "vcsim-Passw0rd")}
	t := &tracker{
		disks:       map[string]*diskState{},
		snapSeq:     map[string]map[int32]int{},
		snapVM:      map[string]string{},
		snapFiles:   map[string][]string{},
		lastEnabled: map[string]bool{},
		datastores:  map[string]string{},
		flats:       map[string]string{},
	}
	for _, obj := range simulator.Map.All("Datastore") {
		ds := obj.(*simulator.Datastore)
		dir, _ := filepath.Abs(ds.Info.GetDatastoreInfo().Url)
		t.datastores[ds.Name] = dir
	}
	// Disk size and count per VM from the environment (vcsim's default is one 1 MiB disk).
	diskMB, _ := strconv.Atoi(os.Getenv("VCSIM_DISK_MB"))
	if diskMB <= 0 {
		diskMB = 64
	}
	disks, _ := strconv.Atoi(os.Getenv("VCSIM_DISKS"))
	if disks <= 0 {
		disks = 2
	}
	for _, obj := range simulator.Map.All("VirtualMachine") {
		vm := obj.(*simulator.VirtualMachine)
		var first *types.VirtualDisk
		for _, d := range vm.Config.Hardware.Device {
			if disk, ok := d.(*types.VirtualDisk); ok && first == nil {
				first = disk
			}
		}
		if first == nil {
			continue
		}
		first.CapacityInKB = int64(diskMB) * 1024
		first.CapacityInBytes = int64(diskMB) << 20
		for n := 2; n <= disks; n++ {
			d := *first
			d.Key = first.Key + int32(n-1)
			unit := *first.UnitNumber + int32(n-1)
			d.UnitNumber = &unit
			b := *first.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			b.FileName = strings.Replace(b.FileName, "disk1.vmdk", fmt.Sprintf("disk%d.vmdk", n), 1)
			b.Uuid = uuid.New().String()
			// VCSIM_INDEPENDENT_DISKS="3,4": those disks are independent (persistent), left out of snapshots.
			for _, k := range strings.Split(os.Getenv("VCSIM_INDEPENDENT_DISKS"), ",") {
				if k == strconv.Itoa(n) {
					b.DiskMode = string(types.VirtualDiskModeIndependent_persistent)
				}
			}
			// VCSIM_THICK_EAGER_DISKS="2": those disks are thick, eagerly zeroed (the others thin).
			thin := true
			b.ThinProvisioned = &thin
			for _, k := range strings.Split(os.Getenv("VCSIM_THICK_EAGER_DISKS"), ",") {
				if k == strconv.Itoa(n) {
					thick, eager := false, true
					b.ThinProvisioned, b.EagerlyScrub = &thick, &eager
				}
			}
			d.Backing = &b
			d.DeviceInfo = &types.Description{Label: fmt.Sprintf("Hard disk %d", n), Summary: fmt.Sprintf("%d KB", d.CapacityInKB)}
			vm.Config.Hardware.Device = append(vm.Config.Hardware.Device, &d)
		}
	}
	t.ensureFlatFiles()
	simulator.Map.AddHandler(t)
	s := model.Service.NewServer()
	inner := s.Config.Handler
	s.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && r.URL.Path == "/sdk" {
			// Disks of VMs created through the API get their flat files too.
			t.ensureFlatFiles()
			body, err := io.ReadAll(r.Body)
			if err == nil && bytes.Contains(body, []byte("QueryChangedDiskAreas")) {
				t.queryChangedDiskAreas(w, body)
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		inner.ServeHTTP(w, r)
	})
	if spec := os.Getenv("VCSIM_TAGS"); spec != "" {
		if err := makeTags(s.URL, spec); err != nil {
			panic(fmt.Sprintf("VCSIM_TAGS: %v", err))
		}
	}
	cert := s.Certificate()
	sha1sum := sha1.Sum(cert.Raw)
	sha256sum := sha256.Sum256(cert.Raw)
	hexColons := func(b []byte) string {
		parts := make([]string, len(b))
		for i, x := range b {
			parts[i] = fmt.Sprintf("%02X", x)
		}
		return strings.Join(parts, ":")
	}
	u := *s.URL
	user := u.User.Username()
	pass, _ := u.User.Password()
	u.User = nil
	info := map[string]interface{}{
		"url":        u.String(),
		"username":   user,
		"password":   pass,
		"sha1":       hexColons(sha1sum[:]),
		"sha256":     hexColons(sha256sum[:]),
		"datastores": t.datastores,
		"ca_pem":     string(caPEM),
	}
	out, _ := json.Marshal(info)
	fmt.Println(string(out))
	c := make(chan os.Signal, 1)
	signal.Notify(c, os.Interrupt, syscall.SIGTERM)
	<-c
	s.Close()
	model.Remove()
}

// makeTags creates the tags of VCSIM_TAGS through the vAPI REST endpoint, as an administrator would, and
// attaches them to the VMs named.
func makeTags(u *url.URL, spec string) error {
	ctx := context.Background()
	c, err := govmomi.NewClient(ctx, u, true)
	if err != nil {
		return err
	}
	rc := rest.NewClient(c.Client)
	if err := rc.Login(ctx, u.User); err != nil {
		return err
	}
	m := tags.NewManager(rc)
	categories := map[string]string{}
	for _, entry := range strings.Split(spec, ";") {
		kv := strings.SplitN(entry, "=", 2)
		path := strings.SplitN(kv[0], "/", 2)
		if len(kv) != 2 || len(path) != 2 {
			return fmt.Errorf("%q is not Category/tag=VM,VM", entry)
		}
		category, ok := categories[path[0]]
		if !ok {
			category, err = m.CreateCategory(ctx, &tags.Category{
				Name: path[0], Cardinality: "MULTIPLE", AssociableTypes: []string{"VirtualMachine"},
			})
			if err != nil {
				return err
			}
			categories[path[0]] = category
		}
		tag, err := m.CreateTag(ctx, &tags.Tag{Name: path[1], CategoryID: category})
		if err != nil {
			return err
		}
		for _, name := range strings.Split(kv[1], ",") {
			if name == "" {
				continue
			}
			var found *simulator.VirtualMachine
			for _, obj := range simulator.Map.All("VirtualMachine") {
				if vm := obj.(*simulator.VirtualMachine); vm.Name == name {
					found = vm
				}
			}
			if found == nil {
				return fmt.Errorf("no VM %q", name)
			}
			if err := m.AttachTag(ctx, tag, found.Reference()); err != nil {
				return err
			}
		}
	}
	return rc.Logout(ctx)
}

// makeCertificates returns a CA (PEM) and a server certificate for 127.0.0.1/localhost that it signed.
func makeCertificates() ([]byte, tls.Certificate) {
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "vcsim test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		panic(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:     []string{"localhost"},
	}
	caCert, _ := x509.ParseCertificate(caDER)
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		panic(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		tls.Certificate{Certificate: [][]byte{leafDER, caDER}, PrivateKey: key}
}

// ensureFlatFiles gives every VM disk that has none a sparse flat file of its capacity, for the guest (the
// test) to write into and the test VDDK to read.
func (t *tracker) ensureFlatFiles() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, obj := range simulator.Map.All("VirtualMachine") {
		vm := obj.(*simulator.VirtualMachine)
		if vm.Config == nil || vm.Config.Hardware.Device == nil {
			continue
		}
		for _, d := range vm.Config.Hardware.Device {
			disk, ok := d.(*types.VirtualDisk)
			if !ok {
				continue
			}
			b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			if !ok {
				continue
			}
			p := t.flatPath(b.FileName)
			if p == "" {
				continue
			}
			size := disk.CapacityInBytes
			if size == 0 {
				size = disk.CapacityInKB * 1024
			}
			// Created, or seen while its device was still being configured (size 0): grow it to the capacity.
			if st, err := os.Stat(p); err == nil && st.Size() >= size {
				continue
			}
			if f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644); err == nil {
				f.Truncate(size)
				f.Close()
			}
		}
	}
}
