// Package xdg finds the XDG base directories govllm keeps its files in: the configuration
// (the server registry) and the state (the running servers' pid files and logs).
package xdg

import (
	"fmt"
	"os"
	"path/filepath"
)

// ConfigHome is $XDG_CONFIG_HOME, or ~/.config when it is unset or relative (the XDG spec
// says a relative value is to be ignored).
func ConfigHome() (string, error) { return dir("XDG_CONFIG_HOME", ".config") }

// StateHome is $XDG_STATE_HOME, or ~/.local/state when it is unset or relative.
func StateHome() (string, error) { return dir("XDG_STATE_HOME", filepath.Join(".local", "state")) }

func dir(env, fallback string) (string, error) {
	if d := os.Getenv(env); filepath.IsAbs(d) {
		return d, nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("no $%s and no home directory: %w", env, err)
	}
	return filepath.Join(home, fallback), nil
}
