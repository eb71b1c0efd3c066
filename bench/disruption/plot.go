package main

import (
	"fmt"
	"image/color"
	"math"
	"os"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// phaseColors shade the phases of a timeline (translucent).
var phaseColors = []color.NRGBA{
	{0x1f, 0x77, 0xb4, 0x30}, {0xff, 0x7f, 0x0e, 0x30}, {0x2c, 0xa0, 0x2c, 0x30}, {0xd6, 0x27, 0x28, 0x30},
	{0x94, 0x67, 0xbd, 0x30}, {0x8c, 0x56, 0x4b, 0x30}, {0xe3, 0x77, 0xc2, 0x30}, {0x7f, 0x7f, 0x7f, 0x30},
	{0xbc, 0xbd, 0x22, 0x30}, {0x17, 0xbe, 0xcf, 0x30},
}

// Timeline draws one run: each probe's reply latency (log scale) against
// the time it was sent, since the move started, echo and ICMP apart;
// unanswered requests as crosses along the top; the phases shaded. PNG.
func Timeline(file, title string, start time.Time, samples []Sample, phases []PhaseMs) error {
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = "time since the move started (s)"
	p.Y.Label.Text = "reply latency (ms, log scale)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	p.Legend.Top = true
	series := map[string]plotter.XYs{}
	var lost plotter.XYs
	lo, hi := math.Inf(1), 0.0
	xmin, xmax := 0.0, 0.0
	for _, s := range samples {
		x := s.At.Sub(start).Seconds()
		xmin, xmax = math.Min(xmin, x), math.Max(xmax, x)
		if s.Latency < 0 {
			lost = append(lost, plotter.XY{X: x})
			continue
		}
		y := math.Max(float64(s.Latency)/float64(time.Millisecond), 0.1)
		lo, hi = math.Min(lo, y), math.Max(hi, y)
		series[s.Kind] = append(series[s.Kind], plotter.XY{X: x, Y: y})
	}
	if math.IsInf(lo, 1) {
		lo, hi = 1, 1000
	}
	top := hi * 2
	bottom := lo / 2
	for i := range lost {
		lost[i].Y = top
	}
	for i, ph := range phases {
		x0, x1 := ph.FromMs/1000, ph.ToMs/1000
		if x1 <= x0 {
			continue
		}
		xmin, xmax = math.Min(xmin, x0), math.Max(xmax, x1)
		poly, err := plotter.NewPolygon(plotter.XYs{{X: x0, Y: bottom}, {X: x1, Y: bottom}, {X: x1, Y: top}, {X: x0, Y: top}})
		if err != nil {
			return err
		}
		poly.Color = phaseColors[i%len(phaseColors)]
		poly.LineStyle.Width = 0
		p.Add(poly)
		p.Legend.Add(ph.Name, poly)
	}
	kinds := []struct {
		name string
		c    color.RGBA
	}{{"echo", color.RGBA{0, 0, 0xc0, 0xff}}, {"icmp", color.RGBA{0, 0x90, 0, 0xff}}}
	for _, k := range kinds {
		if len(series[k.name]) == 0 {
			continue
		}
		sc, err := plotter.NewScatter(series[k.name])
		if err != nil {
			return err
		}
		sc.GlyphStyle.Radius = vg.Points(0.8)
		sc.GlyphStyle.Color = k.c
		p.Add(sc)
		p.Legend.Add(k.name+" reply", sc)
	}
	if len(lost) > 0 {
		sc, err := plotter.NewScatter(lost)
		if err != nil {
			return err
		}
		sc.GlyphStyle.Shape = draw.CrossGlyph{}
		sc.GlyphStyle.Radius = vg.Points(2)
		sc.GlyphStyle.Color = color.RGBA{0xd0, 0, 0, 0xff}
		p.Add(sc)
		p.Legend.Add(fmt.Sprintf("unanswered (%d)", len(lost)), sc)
	}
	p.X.Min, p.X.Max = xmin, xmax
	p.Y.Min, p.Y.Max = bottom, top*1.2
	return p.Save(28*vg.Centimeter, 14*vg.Centimeter, file)
}

// barErr is a mode's median with its min and max as error bars.
type barErr struct {
	xy     plotter.XYs
	lo, hi []float64
}

func (b barErr) Len() int                        { return len(b.xy) }
func (b barErr) XY(i int) (float64, float64)     { return b.xy[i].X, b.xy[i].Y }
func (b barErr) YError(i int) (float64, float64) { return b.lo[i], b.hi[i] }

// shortMode labels a mode on an axis.
func shortMode(m string) string {
	if base, rest, ok := strings.Cut(m, "@"); ok {
		return shortMode(base) + "@" + rest
	}
	if base, rest, ok := strings.Cut(m, "+"); ok {
		return shortMode(base) + "+" + rest
	}
	switch m {
	case modeFreeze:
		return "freeze"
	case modeDNSOnly:
		return "dns-only"
	case modeEBPF:
		return "ebpf"
	case modeUserspace:
		return "userspace"
	}
	return m
}

// Bars draws the decomposed metrics across modes: one panel per metric,
// one bar per mode at its median, min to max as error bars; a mode not
// available has no bar. PNG.
func Bars(file string, modes []ModeResult, names []string) error {
	cols := 3
	rows := (len(names) + cols - 1) / cols
	plots := make([][]*plot.Plot, rows)
	for i := range plots {
		plots[i] = make([]*plot.Plot, cols)
	}
	var labels []string
	for _, m := range modes {
		labels = append(labels, shortMode(m.Mode))
	}
	for i, name := range names {
		p := plot.New()
		p.Title.Text = name
		vals := make(plotter.Values, len(modes))
		be := barErr{lo: make([]float64, len(modes)), hi: make([]float64, len(modes))}
		for j, m := range modes {
			st, ok := m.Stats[name]
			if ok {
				vals[j] = st.Median
				be.lo[j], be.hi[j] = st.Median-st.Min, st.Max-st.Median
			}
			be.xy = append(be.xy, plotter.XY{X: float64(j), Y: vals[j]})
		}
		bc, err := plotter.NewBarChart(vals, vg.Points(18))
		if err != nil {
			return err
		}
		bc.Color = color.RGBA{0x44, 0x77, 0xaa, 0xff}
		bc.LineStyle.Width = 0
		p.Add(bc)
		eb, err := plotter.NewYErrorBars(be)
		if err != nil {
			return err
		}
		p.Add(eb)
		p.NominalX(labels...)
		p.Y.Min = 0
		plots[i/cols][i%cols] = p
	}
	for r := range plots {
		for c := range plots[r] {
			if plots[r][c] == nil {
				plots[r][c] = plot.New()
				plots[r][c].HideAxes()
			}
		}
	}
	w, h := 30*vg.Centimeter, vg.Length(rows)*7*vg.Centimeter
	img := vgimg.New(w, h)
	dc := draw.New(img)
	t := draw.Tiles{Rows: rows, Cols: cols, PadX: vg.Millimeter * 4, PadY: vg.Millimeter * 4,
		PadTop: vg.Millimeter * 2, PadBottom: vg.Millimeter * 2, PadLeft: vg.Millimeter * 2, PadRight: vg.Millimeter * 2}
	canvases := plot.Align(plots, t, dc)
	for r := range plots {
		for c := range plots[r] {
			plots[r][c].Draw(canvases[r][c])
		}
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
