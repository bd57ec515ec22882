package launch

import (
	"fmt"

	"github.com/govllm/govllm/internal/pyfind"
)

// Runners are the --runner values govllm serves: vLLM's "generate" (chat and completions, the
// default) and "pooling" (embeddings, /v1/embeddings only).
var Runners = []string{"generate", "pooling"}

// checkRunner validates --runner and --convert (vLLM's flags): convert "embed" turns a
// generative checkpoint into an embedding model, so it needs the pooling runner.
func checkRunner(opts Options) error {
	switch opts.Runner {
	case "", "generate", "pooling":
	default:
		return fmt.Errorf("%w: --runner %q: use generate (chat and completions) or pooling (embeddings)", ErrBadOptions, opts.Runner)
	}
	switch opts.Convert {
	case "", "auto", "none":
	case "embed":
		if opts.Runner != "pooling" {
			return fmt.Errorf("%w: --convert embed makes an embedding model: it needs --runner pooling", ErrBadOptions)
		}
	default:
		return fmt.Errorf("%w: --convert %q: use embed (with --runner pooling), or leave it out", ErrBadOptions, opts.Convert)
	}
	return nil
}

// runnerArgs writes the runner into the engine arguments: vLLM's runner and convert fields;
// the transformers backend reads runner (its pooling path loads AutoModel, which embeds any
// checkpoint, so convert has nothing to do there).
func (p *Plan) runnerArgs(opts Options) {
	if opts.Runner == "" || opts.Runner == "generate" {
		return
	}
	p.EngineArgs["runner"] = opts.Runner
	if opts.Convert == "" || opts.Convert == "auto" || opts.Convert == "none" {
		return
	}
	if p.Engine == pyfind.VLLM {
		p.EngineArgs["convert"] = opts.Convert
	} else {
		p.note("convert %s: the transformers pooling runner loads AutoModel, which embeds any checkpoint", opts.Convert)
	}
}
