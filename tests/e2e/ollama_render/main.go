// Renders an Ollama Modelfile TEMPLATE with Go's text/template, the engine Ollama runs it with, over data shaped
// like Ollama's (.Messages with Role, Content, Thinking and ToolCalls[].Function.{Name, Arguments}; .Tools).
// Reads {"Template", "Messages", "Tools"} as JSON on stdin, writes the prompt to stdout. Arguments and tools
// arrive as JSON text and print as given, as Ollama's types print through their String methods.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"text/template"
)

type jsonText string

func (j jsonText) String() string { return string(j) }

type function struct {
	Name      string
	Arguments jsonText
}

type toolCall struct{ Function function }

type message struct {
	Role, Content, Thinking string
	ToolCalls               []toolCall
}

type request struct {
	Template string
	Messages []struct {
		Role, Content, Thinking string
		ToolCalls               []struct{ Name, Arguments string }
	}
	Tools []string
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	tpl, err := template.New("modelfile").Parse(req.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	data := struct {
		Messages []message
		Tools    []jsonText
	}{}
	for _, m := range req.Messages {
		msg := message{Role: m.Role, Content: m.Content, Thinking: m.Thinking}
		for _, c := range m.ToolCalls {
			msg.ToolCalls = append(msg.ToolCalls, toolCall{function{c.Name, jsonText(c.Arguments)}})
		}
		data.Messages = append(data.Messages, msg)
	}
	for _, t := range req.Tools {
		data.Tools = append(data.Tools, jsonText(t))
	}
	if err := tpl.Execute(os.Stdout, data); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
