// rasterkube view: GeoZarr rasters (tiles rendered by the server), GeoParquet features (GeoJSON)
// and PMTiles (range requests, read by the pmtiles library) on a basemap-free MapLibre map.
// window.rasterkube.ready is true once every visible tile has loaded (used by screenshots).
"use strict";

(async function main() {
  const state = (window.rasterkube = { ready: false, errors: [], layers: [], map: null });
  const status = document.getElementById("status");
  const fail = (message) => {
    state.errors.push(message);
    status.textContent = message;
  };
  const origin = window.location.origin;
  const FEATURE_COLOURS = ["#d62728", "#ff7f0e", "#e377c2", "#17becf", "#9467bd", "#8c564b"];

  let layers, colours;
  try {
    const [a, b] = await Promise.all([fetch("api/layers"), fetch("api/colormaps")]);
    layers = (await a.json()).layers;
    colours = await b.json();
  } catch (err) {
    fail(`could not load the layer list: ${err}`);
    return;
  }
  state.layers = layers;

  const protocol = new pmtiles.Protocol();
  maplibregl.addProtocol("pmtiles", protocol.tile);

  const bounds = unionBounds(layers.map((l) => l.bounds).filter(Boolean));
  const map = new maplibregl.Map({
    container: "map",
    style: {
      version: 8,
      sources: {},
      layers: [{ id: "background", type: "background", paint: { "background-color": "#eef0f2" } }],
    },
    bounds: bounds,
    fitBoundsOptions: { padding: { top: 40, bottom: 40, left: 300, right: 40 } },
    attributionControl: false,
    fadeDuration: 0,
  });
  state.map = map;
  map.addControl(new maplibregl.NavigationControl({ showCompass: false }), "top-right");
  map.addControl(new maplibregl.ScaleControl(), "bottom-right");
  map.on("error", (e) => fail(String((e.error && e.error.message) || e)));

  const markReady = () => {
    state.ready = false;
    map.once("idle", () => (state.ready = true));
  };

  map.on("load", () => {
    let featureIndex = 0;
    for (const layer of layers) {
      const panel = layerPanel(layer);
      if (layer.kind === "raster") addRaster(layer, panel);
      else addFeatures(layer, panel, FEATURE_COLOURS[featureIndex++ % FEATURE_COLOURS.length]);
    }
    markReady();
  });

  // ------------------------------------------------------------------------------ rasters

  function addRaster(layer, panel) {
    // Open on the first band and time step with data (a difference score is NaN at the first).
    const start = Math.max(0, layer.bands.findIndex((b) => b.times_with_data.length));
    const s = { band: start, time: layer.bands[start].times_with_data[0] || 0, colormap: colours.default };
    const tileUrl = () => {
      const q = new URLSearchParams({ band: layer.bands[s.band].name, time: String(s.time) });
      if (!layer.bands[s.band].categorical) q.set("colormap", s.colormap);
      return `${origin}/tiles/${encodeURIComponent(layer.id)}/{z}/{x}/{y}.png?${q}`;
    };
    map.addSource(layer.id, {
      type: "raster",
      tiles: [tileUrl()],
      tileSize: 256,
      bounds: layer.bounds,
      maxzoom: layer.maxzoom,
    });
    map.addLayer({
      id: layer.id,
      type: "raster",
      source: layer.id,
      paint: { "raster-resampling": "nearest", "raster-fade-duration": 0 },
    });
    const legend = el("div", { className: "legend" });
    const refresh = () => {
      map.getSource(layer.id).setTiles([tileUrl()]);
      drawLegend(legend, layer.bands[s.band], s.colormap);
      markReady();
    };
    const bandSelect = select(layer.bands.map((b) => b.name), s.band, (i) => ((s.band = i), refresh()));
    const timeSelect = select(layer.times, s.time, (i) => ((s.time = i), refresh()));
    const cmapSelect = select(Object.keys(colours.colormaps), Object.keys(colours.colormaps).indexOf(s.colormap),
      (i) => ((s.colormap = Object.keys(colours.colormaps)[i]), refresh()));
    panel.append(
      labelled("band", bandSelect),
      labelled("time", timeSelect),
      labelled("colours", cmapSelect),
      labelled("opacity", range((v) => map.setPaintProperty(layer.id, "raster-opacity", v))),
      legend,
    );
    bandSelect.disabled = layer.bands.length < 2;
    timeSelect.disabled = layer.times.length < 2;
    drawLegend(legend, layer.bands[s.band], s.colormap);
  }

  function drawLegend(legend, band, colormap) {
    legend.replaceChildren();
    if (band.categorical) {
      for (const value of band.classes || []) {
        const colour = colours.categorical[((Math.trunc(value) % 10) + 10) % 10];
        legend.append(el("span", { className: "class" }, [swatch(colour), String(value)]));
      }
      return;
    }
    const stops = colours.colormaps[colormap];
    const bar = el("div", { className: "bar" });
    bar.style.background = `linear-gradient(to right, ${stops.join(", ")})`;
    legend.append(bar, el("div", { className: "ticks" }, [el("span", {}, [fmt(band.vmin)]), el("span", {}, [fmt(band.vmax)])]));
  }

  // ------------------------------------------------------------------------------ features

  function addFeatures(layer, panel, colour) {
    let sourceLayers = [null];
    if (layer.kind === "pmtiles") {
      map.addSource(layer.id, {
        type: "vector",
        url: `pmtiles://${origin}/files/${encodeURIComponent(layer.id)}.pmtiles`,
      });
      sourceLayers = layer.vector_layers.length ? layer.vector_layers : ["features"];
    } else {
      map.addSource(layer.id, { type: "geojson", data: `${origin}/features/${encodeURIComponent(layer.id)}.geojson` });
    }
    const ids = [];
    const geometryFilters = {};
    for (const sourceLayer of sourceLayers) {
      const extra = sourceLayer ? { "source-layer": sourceLayer } : {};
      const suffix = sourceLayer ? `-${sourceLayer}` : "";
      const isType = (types) => ["match", ["geometry-type"], types, true, false];
      const polygons = isType(["Polygon", "MultiPolygon"]);
      const lines = isType(["Polygon", "MultiPolygon", "LineString", "MultiLineString"]);
      const points = isType(["Point", "MultiPoint"]);
      const defs = [
        { id: `${layer.id}${suffix}-fill`, type: "fill", filter: polygons, paint: { "fill-color": colour, "fill-opacity": 0.35 } },
        { id: `${layer.id}${suffix}-line`, type: "line", filter: lines, paint: { "line-color": colour, "line-width": 1.5 } },
        { id: `${layer.id}${suffix}-point`, type: "circle", filter: points,
          paint: { "circle-color": colour, "circle-radius": 4, "circle-stroke-color": "#fff", "circle-stroke-width": 1 } },
      ];
      for (const def of defs) {
        map.addLayer({ ...def, source: layer.id, ...extra });
        ids.push(def.id);
        geometryFilters[def.id] = def.filter;
        map.on("click", def.id, (e) => popup(e, layer.id));
        map.on("mouseenter", def.id, () => (map.getCanvas().style.cursor = "pointer"));
        map.on("mouseleave", def.id, () => (map.getCanvas().style.cursor = ""));
      }
    }
    panel.dataset.layerIds = ids.join(",");
    const count = layer.count !== undefined ? `${layer.count} features` : `zoom ${layer.minzoom}–${layer.maxzoom}`;
    if (layer.times && layer.times.length > 1) {
      // Features of one time step (the `time` column), or all.
      const choices = ["all", ...layer.times.map((t) => t.replace("T00:00:00", ""))];
      panel.append(labelled("time", select(choices, 0, (i) => {
        for (const id of ids) {
          const only = i === 0 ? true : ["==", ["to-string", ["get", "time"]], layer.times[i - 1]];
          map.setFilter(id, ["all", geometryFilters[id], only]);
        }
        markReady();
      })));
    }
    panel.append(
      labelled("opacity", range((v) => {
        for (const id of ids) {
          const type = map.getLayer(id).type;
          if (type === "fill") map.setPaintProperty(id, "fill-opacity", 0.35 * v);
          else if (type === "line") map.setPaintProperty(id, "line-opacity", v);
          else map.setPaintProperty(id, "circle-opacity", v);
        }
      })),
      el("div", { className: "legend" }, [el("span", { className: "class" }, [swatch(colour), count])]),
    );
  }

  function popup(e, layerId) {
    const props = e.features[0].properties;
    const rows = Object.entries(props).map(([k, v]) => el("tr", {}, [el("td", {}, [k]), el("td", {}, [fmt(v)])]));
    const body = el("div", {}, [el("strong", {}, [layerId]), el("table", { className: "popup-table" }, rows)]);
    new maplibregl.Popup({ maxWidth: "320px" }).setLngLat(e.lngLat).setDOMContent(body).addTo(map);
  }

  // ------------------------------------------------------------------------------ panel

  function layerPanel(layer) {
    const box = el("section", { className: "layer" });
    const toggle = el("input", { type: "checkbox", checked: true });
    toggle.addEventListener("change", () => {
      const ids = layer.kind === "raster" ? [layer.id] : (box.dataset.layerIds || "").split(",").filter(Boolean);
      for (const id of ids) map.setLayoutProperty(id, "visibility", toggle.checked ? "visible" : "none");
      markReady();
    });
    const fit = el("button", { type: "button", title: "zoom to layer", textContent: "⤢" });
    fit.addEventListener("click", () => layer.bounds && map.fitBounds(layer.bounds, { padding: 40 }));
    box.append(el("header", {}, [toggle, el("span", {}, [layer.id, " ", el("span", { className: "kind" }, [layer.kind])]), fit]));
    document.getElementById("layers").append(box);
    return box;
  }

  function el(tag, props, children) {
    const node = Object.assign(document.createElement(tag), props || {});
    for (const child of children || []) node.append(child);
    return node;
  }
  function labelled(text, control) {
    return el("label", {}, [text, control]);
  }
  function select(options, selected, onChange) {
    const node = el("select", {}, options.map((o, i) => el("option", { value: String(i), textContent: o, selected: i === selected })));
    node.addEventListener("change", () => onChange(Number(node.value)));
    return node;
  }
  function range(onInput) {
    const node = el("input", { type: "range", min: "0", max: "1", step: "0.05", value: "1" });
    node.addEventListener("input", () => onInput(Number(node.value)));
    return node;
  }
  function swatch(colour) {
    const node = el("span", { className: "swatch" });
    node.style.background = colour;
    return node;
  }
  function fmt(v) {
    if (typeof v !== "number") return String(v);
    return Math.abs(v) >= 1000 || (Math.abs(v) < 0.01 && v !== 0) ? v.toExponential(2) : String(Math.round(v * 1000) / 1000);
  }
  function unionBounds(list) {
    if (!list.length) return [-180, -80, 180, 80];
    return [
      Math.min(...list.map((b) => b[0])), Math.min(...list.map((b) => b[1])),
      Math.max(...list.map((b) => b[2])), Math.max(...list.map((b) => b[3])),
    ];
  }
})();
