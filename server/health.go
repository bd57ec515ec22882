package server

import "net/http"

// handleHealth serves GET /health: 200 with an empty body while the backend and every
// [Config.HealthChecks] are healthy, else 503 with an error body naming the first failure.
func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	if err := s.health(); err != nil {
		s.log.Warn("health check failed", "err", err)
		writeError(w, errorf(http.StatusServiceUnavailable, "", "%s", err.Error()))
		return
	}
	w.WriteHeader(http.StatusOK)
}
