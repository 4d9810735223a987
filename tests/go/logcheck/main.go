// Command logcheck checks the log's outputs with Go's golang.org/x/mod/sumdb/{note,tlog}.
//
// It reads one JSON request on stdin (written by tests/test_log_interop.py) and writes a JSON
// report on stdout; any failure is printed on stderr with exit status 1. It checks:
//
//   - the signed note opens with note.Open under the given verifier keys, and its text is the
//     checkpoint of the tree;
//   - Go recomputes the tree from our entry bundles (tlog.StoredHashes): the root is the
//     checkpoint's and every tile on disk (C2SP layout: tile/<L>/<N>, Go's tile/8/<L>/<N>
//     without the height) is the one tlog.ReadTileData builds; Go's tile client,
//     tlog.TileHashReader, also reads the root from our tiles. (The tile client alone does not
//     catch every bad tile: in golang.org/x/mod 0.7.0 it skips authenticating child tiles when
//     several subtrees of the tree hash share one tile, as at size 66,536.)
//   - every inclusion and consistency proof passes tlog.CheckRecord / tlog.CheckTree, or fails
//     where the request says it must, and valid ones equal what tlog.ProveRecord / ProveTree
//     compute from the entries.
//
// With tiles_url set, everything (the checkpoint, when the request has no note, the tiles and
// the entry bundles) is read over HTTP from that c2sp.org/tlog-tiles prefix instead of tiles_dir,
// with net/http (which asks for gzip and decodes it).
//
// A partial tile or bundle that is not there (HTTP 404, or no such file) is read as the prefix
// of the full one at its position, as c2sp.org/tlog-tiles lets a log delete partials once the
// full one exists and as Go's own sumdb client does (golang.org/x/mod/sumdb Client.readTile:
// "If the partial tile does not exist, it should be because the tile has been completed");
// each path read so is listed in the report (full_fallbacks). With "older" (older signed
// checkpoints of the same log), each one's note must open, each listed entry's inclusion in
// that older tree is proven with tlog.ProveRecord through tlog.TileHashReader over the older
// tree (whose partial tiles the log may have pruned) and checked with tlog.CheckRecord, and
// the latest tree must be consistent with it (tlog.ProveTree / CheckTree through the tiles).
//
// Build without network in GOPATH mode: GO111MODULE=off GOPATH=/usr/share/gocode go build.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

const height = 8

type inclusion struct {
	Index int64       `json:"index"`
	Size  int64       `json:"size"`
	Root  tlog.Hash   `json:"root"`
	Leaf  tlog.Hash   `json:"leaf"`
	Proof []tlog.Hash `json:"proof"`
	Valid bool        `json:"valid"`
}

type consistency struct {
	Old     int64       `json:"old"`
	New     int64       `json:"new"`
	OldRoot tlog.Hash   `json:"old_root"`
	NewRoot tlog.Hash   `json:"new_root"`
	Proof   []tlog.Hash `json:"proof"`
	Valid   bool        `json:"valid"`
}

type older struct {
	Note    string  `json:"note"`
	Indexes []int64 `json:"indexes"`
}

type request struct {
	Older        []older       `json:"older"`
	VerifierKeys []string      `json:"vkeys"`
	Note         string        `json:"note"`
	TilesDir     string        `json:"tiles_dir"`
	TilesURL     string        `json:"tiles_url"`
	Size         int64         `json:"size"`
	Root         tlog.Hash     `json:"root"`
	Inclusion    []inclusion   `json:"inclusion"`
	Consistency  []consistency `json:"consistency"`
}

type report struct {
	SignedBy    []string `json:"signed_by"`
	Origin      string   `json:"origin"`
	TilePaths   []string `json:"tile_paths"`
	Inclusion   int      `json:"inclusion_checked"`
	Consistency int      `json:"consistency_checked"`
	RejectedBad int      `json:"rejected_bad"`
	Older       int      `json:"older_inclusion_checked"`
	Fallbacks   []string `json:"full_fallbacks"`
}

// errNotThere: the log does not have the file (HTTP 404, or no such file in the directory).
var errNotThere = fmt.Errorf("not there")

// source reads the log's files (C2SP paths) from a directory or, with url set, over HTTP.
type source struct {
	dir       string
	url       string
	fallbacks *[]string
}

func (s source) read(path string) ([]byte, error) {
	if s.url == "" {
		data, err := os.ReadFile(filepath.Join(s.dir, filepath.FromSlash(path)))
		if os.IsNotExist(err) {
			return nil, fmt.Errorf("%s: %w", path, errNotThere)
		}
		return data, err
	}
	resp, err := http.Get(s.url + path)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		return nil, fmt.Errorf("GET %s%s: %s: %w", s.url, path, resp.Status, errNotThere)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s%s: %s", s.url, path, resp.Status)
	}
	return io.ReadAll(io.LimitReader(resp.Body, 1<<25))
}

// readPartial reads a tile or bundle path; a partial one (".p/<W>") that is not there is read
// as the full one at its position, whose prefix the caller takes (full tells it so).
func (s source) readPartial(path string) (data []byte, full bool, err error) {
	data, err = s.read(path)
	at := strings.LastIndex(path, ".p/")
	if err == nil || at < 0 || !errors.Is(err, errNotThere) {
		return data, false, err
	}
	data, err2 := s.read(path[:at])
	if err2 != nil {
		return nil, false, fmt.Errorf("%v, and the full one: %v", err, err2)
	}
	*s.fallbacks = append(*s.fallbacks, path)
	return data, true, nil
}

// dirTiles reads the C2SP tiles of a tree of the given size from a source, for
// tlog.TileHashReader. Go asks for the narrowest tile holding the hashes it needs; a C2SP log
// only has the partial tiles of sizes it checkpointed, so a narrower tile is read as the prefix
// of the tile of the tree's size (the hashes are the same; TileHashReader authenticates them).
type dirTiles struct {
	src  source
	size int64
}

func c2spPath(t tlog.Tile) string {
	// Go's path is tile/<H>/<L>/<N>[.p/<W>]; C2SP drops the height, fixed at 8.
	return "tile/" + strings.TrimPrefix(t.Path(), "tile/"+strconv.Itoa(height)+"/")
}

// widthAt is the width of tile t's position in the tree of the given size (the only width
// a C2SP log is sure to have; 0 if the tree does not reach it).
func widthAt(size int64, t tlog.Tile) int {
	count := size >> (height * t.L)
	if count >= (t.N+1)<<height {
		return 1 << height
	}
	if count <= t.N<<height {
		return 0
	}
	return int(count - t.N<<height)
}

func (d dirTiles) Height() int { return height }

func (d dirTiles) ReadTiles(tiles []tlog.Tile) ([][]byte, error) {
	out := make([][]byte, len(tiles))
	for i, t := range tiles {
		stored := t
		stored.W = widthAt(d.size, t)
		if stored.W < t.W {
			return nil, fmt.Errorf("tile %s is beyond the tree of size %d", c2spPath(t), d.size)
		}
		data, full, err := d.src.readPartial(c2spPath(stored))
		if err != nil {
			return nil, err
		}
		if full && len(data) == (1<<height)*tlog.HashSize {
			data = data[:stored.W*tlog.HashSize]
		}
		if len(data) != stored.W*tlog.HashSize {
			return nil, fmt.Errorf("tile %s is %d bytes", c2spPath(stored), len(data))
		}
		out[i] = data[:t.W*tlog.HashSize]
	}
	return out, nil
}

func (d dirTiles) SaveTiles([]tlog.Tile, [][]byte) {}

func check(req request) (report, error) {
	var rep report
	src := source{req.TilesDir, req.TilesURL, &rep.Fallbacks}
	if req.Note == "" {
		data, err := src.read("checkpoint")
		if err != nil {
			return rep, err
		}
		req.Note = string(data)
	}

	var verifiers []note.Verifier
	for _, vkey := range req.VerifierKeys {
		v, err := note.NewVerifier(vkey)
		if err != nil {
			return rep, fmt.Errorf("note.NewVerifier(%q): %v", vkey, err)
		}
		verifiers = append(verifiers, v)
	}
	n, err := note.Open([]byte(req.Note), note.VerifierList(verifiers...))
	if err != nil {
		return rep, fmt.Errorf("note.Open: %v", err)
	}
	for _, s := range n.Sigs {
		rep.SignedBy = append(rep.SignedBy, fmt.Sprintf("%s+%08x", s.Name, s.Hash))
	}
	lines := strings.Split(n.Text, "\n")
	if len(lines) < 4 || lines[len(lines)-1] != "" {
		return rep, fmt.Errorf("checkpoint text has too few lines: %q", n.Text)
	}
	rep.Origin = lines[0]
	if size, err := strconv.ParseInt(lines[1], 10, 64); err != nil || size != req.Size {
		return rep, fmt.Errorf("checkpoint size %q is not %d", lines[1], req.Size)
	}
	if root, err := tlog.ParseHash(lines[2]); err != nil || root != req.Root {
		return rep, fmt.Errorf("checkpoint root %q is not %v", lines[2], req.Root)
	}

	// Go recomputes the whole tree from our entry bundles, with its own hashing.
	entries, err := readEntries(src, req.Size)
	if err != nil {
		return rep, err
	}
	var stored []tlog.Hash
	mem := tlog.HashReaderFunc(func(indexes []int64) ([]tlog.Hash, error) {
		out := make([]tlog.Hash, len(indexes))
		for i, x := range indexes {
			if x < 0 || x >= int64(len(stored)) {
				return nil, fmt.Errorf("no stored hash %d", x)
			}
			out[i] = stored[x]
		}
		return out, nil
	})
	for n, entry := range entries {
		hashes, err := tlog.StoredHashes(int64(n), entry, mem)
		if err != nil {
			return rep, err
		}
		stored = append(stored, hashes...)
	}
	if h, err := tlog.TreeHash(req.Size, mem); err != nil || h != req.Root {
		return rep, fmt.Errorf("the root Go computes from the entry bundles is not the checkpoint's: %v %v", h, err)
	}
	// Every tile of the tree must be the one Go builds from those hashes.
	for _, t := range tlog.NewTiles(height, 0, req.Size) {
		if t.W != widthAt(req.Size, t) {
			continue // Go lists every partial width; a C2SP log has those of its checkpoints
		}
		want, err := tlog.ReadTileData(t, mem)
		if err != nil {
			return rep, fmt.Errorf("tlog.ReadTileData(%s): %v", c2spPath(t), err)
		}
		got, err := src.read(c2spPath(t))
		if err != nil {
			return rep, err
		}
		if !bytes.Equal(got, want) {
			return rep, fmt.Errorf("tile %s differs from the one Go builds from the entries", c2spPath(t))
		}
		rep.TilePaths = append(rep.TilePaths, c2spPath(t))
	}
	// And Go's tile client reads the tree from our tiles.
	hr := tlog.TileHashReader(tlog.Tree{N: req.Size, Hash: req.Root}, dirTiles{src, req.Size})
	if h, err := tlog.TreeHash(req.Size, hr); err != nil || h != req.Root {
		return rep, fmt.Errorf("tlog.TreeHash through tlog.TileHashReader: %v %v", h, err)
	}

	for _, c := range req.Inclusion {
		err := tlog.CheckRecord(c.Proof, c.Size, c.Root, c.Index, c.Leaf)
		if !c.Valid {
			if err == nil {
				return rep, fmt.Errorf("tlog.CheckRecord accepted a bad proof for %d in %d", c.Index, c.Size)
			}
			rep.RejectedBad++
			continue
		}
		if err != nil {
			return rep, fmt.Errorf("tlog.CheckRecord(%d in %d): %v", c.Index, c.Size, err)
		}
		proof, err := tlog.ProveRecord(c.Size, c.Index, mem)
		if err != nil || !equal(proof, c.Proof) {
			return rep, fmt.Errorf("tlog.ProveRecord(%d in %d) differs: %v", c.Index, c.Size, err)
		}
		rep.Inclusion++
	}
	for _, c := range req.Consistency {
		err := tlog.CheckTree(c.Proof, c.New, c.NewRoot, c.Old, c.OldRoot)
		if !c.Valid {
			if err == nil {
				return rep, fmt.Errorf("tlog.CheckTree accepted a bad proof from %d to %d", c.Old, c.New)
			}
			rep.RejectedBad++
			continue
		}
		if err != nil {
			return rep, fmt.Errorf("tlog.CheckTree(%d to %d): %v", c.Old, c.New, err)
		}
		proof, err := tlog.ProveTree(c.New, c.Old, mem)
		if err != nil || !equal(proof, c.Proof) {
			return rep, fmt.Errorf("tlog.ProveTree(%d to %d) differs: %v", c.Old, c.New, err)
		}
		rep.Consistency++
	}

	// Older signed checkpoints: inclusion in each through its own (maybe pruned) tiles, and
	// the latest tree's consistency with it.
	latest := tlog.Tree{N: req.Size, Hash: req.Root}
	for _, o := range req.Older {
		n, err := note.Open([]byte(o.Note), note.VerifierList(verifiers...))
		if err != nil {
			return rep, fmt.Errorf("note.Open (older checkpoint): %v", err)
		}
		lines := strings.Split(n.Text, "\n")
		size, err := strconv.ParseInt(lines[1], 10, 64)
		if err != nil || len(lines) < 4 {
			return rep, fmt.Errorf("older checkpoint text: %q", n.Text)
		}
		root, err := tlog.ParseHash(lines[2])
		if err != nil {
			return rep, fmt.Errorf("older checkpoint root: %v", err)
		}
		tree := tlog.Tree{N: size, Hash: root}
		entries, err := readEntries(src, size)
		if err != nil {
			return rep, err
		}
		hr := tlog.TileHashReader(tree, dirTiles{src, size})
		for _, index := range o.Indexes {
			proof, err := tlog.ProveRecord(size, index, hr)
			if err != nil {
				return rep, fmt.Errorf("tlog.ProveRecord(%d in the older tree of %d): %v", index, size, err)
			}
			if err := tlog.CheckRecord(proof, size, root, index, tlog.RecordHash(entries[index])); err != nil {
				return rep, fmt.Errorf("tlog.CheckRecord(%d in the older tree of %d): %v", index, size, err)
			}
			rep.Older++
		}
		proof, err := tlog.ProveTree(latest.N, size, tlog.TileHashReader(latest, dirTiles{src, latest.N}))
		if err != nil {
			return rep, fmt.Errorf("tlog.ProveTree(%d to %d): %v", size, latest.N, err)
		}
		if err := tlog.CheckTree(proof, latest.N, latest.Hash, size, root); err != nil {
			return rep, fmt.Errorf("tlog.CheckTree(%d to %d): %v", size, latest.N, err)
		}
	}
	return rep, nil
}

// readEntries reads the entry bundles of a log of the given size (big-endian uint16 length
// prefixes, 256 entries to a full bundle).
func readEntries(src source, size int64) ([][]byte, error) {
	var entries [][]byte
	for n := int64(0); n<<height < size; n++ {
		t := tlog.Tile{H: height, L: 0, N: n}
		t.W = widthAt(size, t)
		path := "tile/entries/" + strings.TrimPrefix(c2spPath(t), "tile/0/")
		data, full, err := src.readPartial(path)
		if err != nil {
			return nil, err
		}
		for i := 0; i < t.W; i++ {
			if len(data) < 2 {
				return nil, fmt.Errorf("%s: entry %d has no length", path, i)
			}
			length := int(data[0])<<8 | int(data[1])
			if len(data) < 2+length {
				return nil, fmt.Errorf("%s: entry %d is cut short", path, i)
			}
			entries = append(entries, data[2:2+length])
			data = data[2+length:]
		}
		if len(data) != 0 && !full {
			return nil, fmt.Errorf("%s: %d bytes after its %d entries", path, len(data), t.W)
		}
	}
	return entries, nil
}

func equal(a, b []tlog.Hash) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func main() {
	var req request
	dec := json.NewDecoder(os.Stdin)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "logcheck: bad request:", err)
		os.Exit(1)
	}
	rep, err := check(req)
	if err != nil {
		fmt.Fprintln(os.Stderr, "logcheck:", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(rep); err != nil {
		fmt.Fprintln(os.Stderr, "logcheck:", err)
		os.Exit(1)
	}
}
