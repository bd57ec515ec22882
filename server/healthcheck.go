package server

// HealthChecker is a condition of health beyond the backend's own, consulted by GET /health
// (see [Config.HealthChecks]); gpu.Monitor is one.
type HealthChecker interface {
	// Health returns nil while healthy, else the reason, which /health reports with 503.
	Health() error
}

// health is the backend's health, then each health check's: the first error, or nil.
func (s *Server) health() error {
	if err := s.backend.Health(); err != nil {
		return err
	}
	for _, c := range s.healthChecks {
		if err := c.Health(); err != nil {
			return err
		}
	}
	return nil
}
