package server

import "net/http"

// modelList is the body of GET /v1/models.
type modelList struct {
	Object string      `json:"object"`
	Data   []modelCard `json:"data"`
}

type modelCard struct {
	ID          string `json:"id"`
	Object      string `json:"object"`
	Created     int64  `json:"created"`
	OwnedBy     string `json:"owned_by"`
	Root        string `json:"root"`
	MaxModelLen int    `json:"max_model_len"`
}

// handleModels serves GET /v1/models: the one model the backend serves.
func (s *Server) handleModels(w http.ResponseWriter, r *http.Request) {
	info := s.backend.Model()
	writeJSON(w, http.StatusOK, modelList{
		Object: "list",
		Data: []modelCard{{
			ID:          info.ID,
			Object:      "model",
			Created:     s.created,
			OwnedBy:     "govllm",
			Root:        info.Root,
			MaxModelLen: info.MaxModelLen,
		}},
	})
}
