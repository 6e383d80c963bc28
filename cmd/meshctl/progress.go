package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

// progressBar redraws one status line on a terminal (stderr), or prints a line every few
// seconds when stderr is a file or pipe. render returns the fraction done (0..1, negative
// when unknown) and the text after the bar.
type progressBar struct {
	w      io.Writer
	tty    bool
	render func() (float64, string)
	stop   chan struct{}
	done   sync.WaitGroup
	once   sync.Once
}

func startProgress(w io.Writer, enabled bool, render func() (float64, string)) *progressBar {
	p := &progressBar{w: w, render: render, stop: make(chan struct{})}
	if !enabled {
		return p
	}
	if f, ok := w.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			p.tty = true
		}
	}
	interval := 5 * time.Second
	if p.tty {
		interval = 200 * time.Millisecond
	}
	p.done.Go(func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-p.stop:
				p.draw(true)
				return
			case <-t.C:
				p.draw(false)
			}
		}
	})
	return p
}

func (p *progressBar) draw(final bool) {
	frac, text := p.render()
	line := text
	if frac >= 0 {
		const width = 30
		n := int(min(max(frac, 0), 1) * width)
		line = fmt.Sprintf("[%s%s] %3.0f%%  %s", strings.Repeat("=", n), strings.Repeat(" ", width-n), min(max(frac, 0), 1)*100, text)
	}
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K%s", line)
		if final {
			fmt.Fprintln(p.w)
		}
		return
	}
	fmt.Fprintln(p.w, line)
}

// Stop draws the last state and ends the bar; safe to call twice.
func (p *progressBar) Stop() {
	p.once.Do(func() { close(p.stop) })
	p.done.Wait()
}

// si formats a count with k/M suffixes.
func si(v float64) string {
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%.2fM", v/1e6)
	case v >= 1e4:
		return fmt.Sprintf("%.1fk", v/1e3)
	}
	return fmt.Sprintf("%.0f", v)
}
