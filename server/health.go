package server

import "net/http"

// handleHealth serves GET /health: 200 with an empty body while the backend is healthy, else
// 503 with an error body.
func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	if err := s.backend.Health(); err != nil {
		s.log.Warn("health check failed", "err", err)
		writeError(w, errorf(http.StatusServiceUnavailable, "", "%s", err.Error()))
		return
	}
	w.WriteHeader(http.StatusOK)
}
