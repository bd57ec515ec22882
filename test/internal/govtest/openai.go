package govtest

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/stretchr/testify/require"
)

// OpenAIClient returns an official OpenAI Go client for the server at url.
func OpenAIClient(url string) openai.Client {
	return openai.NewClient(option.WithBaseURL(url+"/v1"), option.WithAPIKey("unused"), option.WithMaxRetries(0))
}

// capital is a prompt the default model answers greedily with "The capital of France is Paris…".
const capital = "What is the capital of France?"

// RunOpenAIClientTests drives the server at url, serving model with a real backend, through the
// official client: chat and text completions, streamed through the client's accumulator and
// not, n > 1, stop strings and usage. Requests are short: they run on CPUs too.
func RunOpenAIClientTests(t *testing.T, url, model string) {
	client := OpenAIClient(url)
	ctx := func(t *testing.T) context.Context {
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
		t.Cleanup(cancel)
		return ctx
	}
	chatParams := func() openai.ChatCompletionNewParams {
		return openai.ChatCompletionNewParams{
			Model:       model,
			Messages:    []openai.ChatCompletionMessageParamUnion{openai.SystemMessage("You are a helpful assistant."), openai.UserMessage(capital)},
			MaxTokens:   openai.Int(12),
			Temperature: openai.Float(0),
		}
	}

	t.Run("chat stream equals non-stream", func(t *testing.T) {
		full, err := client.Chat.Completions.New(ctx(t), chatParams())
		require.NoError(t, err)
		require.True(t, strings.HasPrefix(full.ID, "chatcmpl-"), full.ID)
		require.Equal(t, model, full.Model)
		require.NotEmpty(t, full.SystemFingerprint)
		require.Len(t, full.Choices, 1)
		require.Equal(t, "assistant", string(full.Choices[0].Message.Role))
		require.Contains(t, full.Choices[0].Message.Content, "Paris")
		require.Contains(t, []string{"stop", "length"}, full.Choices[0].FinishReason)
		require.LessOrEqual(t, full.Usage.CompletionTokens, int64(12))
		require.Positive(t, full.Usage.CompletionTokens)
		require.Equal(t, full.Usage.PromptTokens+full.Usage.CompletionTokens, full.Usage.TotalTokens)

		p := chatParams()
		p.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
		stream := client.Chat.Completions.NewStreaming(ctx(t), p)
		var acc openai.ChatCompletionAccumulator
		ids := map[string]bool{}
		chunks := 0
		for stream.Next() {
			chunk := stream.Current()
			require.True(t, acc.AddChunk(chunk), "the accumulator takes every chunk")
			ids[chunk.ID] = true
			chunks++
		}
		require.NoError(t, stream.Err())
		require.NoError(t, stream.Close())
		require.Len(t, ids, 1, "one id per stream")
		require.Greater(t, chunks, 3, "token by token")
		require.Len(t, acc.Choices, 1)
		require.Equal(t, full.Choices[0].Message.Content, acc.Choices[0].Message.Content, "greedy: the same text streamed")
		require.Equal(t, full.Choices[0].FinishReason, acc.Choices[0].FinishReason)
		require.Equal(t, full.Usage.PromptTokens, acc.Usage.PromptTokens)
		require.Equal(t, full.Usage.CompletionTokens, acc.Usage.CompletionTokens)
	})

	t.Run("chat n=2", func(t *testing.T) {
		p := chatParams()
		p.N = openai.Int(2)
		p.Temperature = openai.Float(1)
		p.Seed = openai.Int(7)
		p.MaxTokens = openai.Int(6)
		full, err := client.Chat.Completions.New(ctx(t), p)
		require.NoError(t, err)
		require.Len(t, full.Choices, 2)
		for i, c := range full.Choices {
			require.EqualValues(t, i, c.Index)
			require.NotEmpty(t, c.Message.Content)
			require.Contains(t, []string{"stop", "length"}, c.FinishReason)
		}
		require.LessOrEqual(t, full.Usage.CompletionTokens, int64(12), "two choices of at most 6 tokens, counted together")
		require.Greater(t, full.Usage.CompletionTokens, int64(6))

		stream := client.Chat.Completions.NewStreaming(ctx(t), p)
		var acc openai.ChatCompletionAccumulator
		for stream.Next() {
			require.True(t, acc.AddChunk(stream.Current()))
		}
		require.NoError(t, stream.Err())
		require.Len(t, acc.Choices, 2)
		for _, c := range acc.Choices {
			require.NotEmpty(t, c.Message.Content)
			require.NotEmpty(t, c.FinishReason)
		}
	})

	t.Run("chat stop", func(t *testing.T) {
		p := chatParams()
		p.MaxTokens = openai.Int(32)
		p.Stop = openai.ChatCompletionNewParamsStopUnion{OfStringArray: []string{" Paris"}}
		full, err := client.Chat.Completions.New(ctx(t), p)
		require.NoError(t, err)
		require.Equal(t, "stop", full.Choices[0].FinishReason)
		require.NotContains(t, full.Choices[0].Message.Content, "Paris")
		require.Contains(t, full.Choices[0].Message.Content, "capital of France is")
	})

	t.Run("text completions", func(t *testing.T) {
		const prompt = "The capital of France is"
		p := openai.CompletionNewParams{
			Model:       openai.CompletionNewParamsModel(model),
			Prompt:      openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)},
			MaxTokens:   openai.Int(6),
			Temperature: openai.Float(0),
		}
		full, err := client.Completions.New(ctx(t), p)
		require.NoError(t, err)
		require.True(t, strings.HasPrefix(full.ID, "cmpl-"), full.ID)
		require.Equal(t, "text_completion", string(full.Object))
		require.Len(t, full.Choices, 1)
		require.NotEmpty(t, full.Choices[0].Text)
		require.Equal(t, "length", string(full.Choices[0].FinishReason))
		require.EqualValues(t, 6, full.Usage.CompletionTokens)

		p.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
		stream := client.Completions.NewStreaming(ctx(t), p)
		var text strings.Builder
		var finish string
		var usage openai.CompletionUsage
		for stream.Next() {
			c := stream.Current()
			require.Equal(t, "text_completion", string(c.Object))
			for _, ch := range c.Choices {
				text.WriteString(ch.Text)
				if ch.FinishReason != "" {
					finish = string(ch.FinishReason)
				}
			}
			if c.Usage.TotalTokens > 0 {
				usage = c.Usage
			}
		}
		require.NoError(t, stream.Err())
		require.Equal(t, full.Choices[0].Text, text.String())
		require.Equal(t, "length", finish)
		require.Equal(t, full.Usage, usage)

		p.StreamOptions = openai.ChatCompletionStreamOptionsParam{}
		p.Echo = openai.Bool(true)
		echoed, err := client.Completions.New(ctx(t), p)
		require.NoError(t, err)
		require.Equal(t, prompt+full.Choices[0].Text, echoed.Choices[0].Text)

		ids := []int64{504, 3575, 282} // any in-vocabulary ids
		p.Echo = openai.Bool(false)
		p.Prompt = openai.CompletionNewParamsPromptUnion{OfArrayOfTokens: ids}
		byIDs, err := client.Completions.New(ctx(t), p)
		require.NoError(t, err)
		require.EqualValues(t, 3, byIDs.Usage.PromptTokens)
		require.EqualValues(t, 6, byIDs.Usage.CompletionTokens)
	})

	t.Run("errors", func(t *testing.T) {
		p := chatParams()
		p.Model = "no-such-model"
		_, err := client.Chat.Completions.New(ctx(t), p)
		var apiErr *openai.Error
		require.ErrorAs(t, err, &apiErr)
		require.Equal(t, 404, apiErr.StatusCode)
		require.Equal(t, "model", apiErr.Param)

		p = chatParams()
		p.Temperature = openai.Float(5)
		_, err = client.Chat.Completions.New(ctx(t), p)
		require.ErrorAs(t, err, &apiErr)
		require.Equal(t, 400, apiErr.StatusCode)
		require.Equal(t, "temperature", apiErr.Param)
	})
}
