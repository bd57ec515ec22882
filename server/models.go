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
	Parent      string `json:"parent,omitempty"` // the base model of an adapter
	MaxModelLen int    `json:"max_model_len"`
}

// handleModels serves GET /v1/models: the model the backend serves, then each LoRA adapter
// with the model as its parent (vLLM's cards).
func (s *Server) handleModels(w http.ResponseWriter, r *http.Request) {
	info := s.backend.Model()
	cards := []modelCard{{
		ID:          info.ID,
		Object:      "model",
		Created:     s.created,
		OwnedBy:     "govllm",
		Root:        info.Root,
		MaxModelLen: info.MaxModelLen,
	}}
	for _, a := range info.Adapters {
		parent := a.Base
		if parent == "" {
			parent = info.ID
		}
		cards = append(cards, modelCard{
			ID:          a.Name,
			Object:      "model",
			Created:     s.created,
			OwnedBy:     "govllm",
			Root:        a.Path,
			Parent:      parent,
			MaxModelLen: info.MaxModelLen,
		})
	}
	writeJSON(w, http.StatusOK, modelList{Object: "list", Data: cards})
}
