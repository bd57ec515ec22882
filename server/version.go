package server

import (
	"net/http"
	"runtime/debug"
)

// versionInfo is the body of GET /version. vLLM answers {"version": vllm.__version__}; govllm
// answers its own version there and adds the backend and its version when the engine knows it.
type versionInfo struct {
	Version        string `json:"version"`
	Backend        string `json:"backend,omitempty"`
	BackendVersion string `json:"backend_version,omitempty"`
}

// handleVersion serves GET /version.
func (s *Server) handleVersion(w http.ResponseWriter, r *http.Request) {
	info := s.backend.Model()
	writeJSON(w, http.StatusOK, versionInfo{Version: s.version, Backend: info.Backend, BackendVersion: info.BackendVersion})
}

// govllmVersion is the version /version reports: the one the binary was built with
// (-X main.version), else the build's module version, else "dev" with its VCS revision.
func govllmVersion(configured string) string {
	if configured != "" && configured != "dev" {
		return configured
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "dev"
	}
	return buildVersion(bi)
}

// buildVersion reads a version out of build info: the main module's, unless it is a local
// build ("(devel)"), which is named by its revision ("dev+<12 hex>", "-dirty" when modified).
func buildVersion(bi *debug.BuildInfo) string {
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	var rev string
	var dirty bool
	for _, st := range bi.Settings {
		switch st.Key {
		case "vcs.revision":
			rev = st.Value
		case "vcs.modified":
			dirty = st.Value == "true"
		}
	}
	if rev == "" {
		return "dev"
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	v := "dev+" + rev
	if dirty {
		v += "-dirty"
	}
	return v
}
