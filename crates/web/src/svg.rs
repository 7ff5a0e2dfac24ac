//! The wait-for graph drawn as SVG: each waiter and holder a labelled node on a circle, an
//! arrow from each waiter to what it waits for. Pure; the page inlines it.

use std::collections::BTreeSet;
use std::fmt::Write;

/// Most nodes drawn; a graph larger than this is cut (and says so).
pub const NODES_MAX: usize = 64;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The graph of `edges` (waiter, holder) as an SVG document.
pub fn wait_for(edges: &[(String, String)]) -> String {
    let names: BTreeSet<&str> = edges.iter().flat_map(|(w, h)| [w.as_str(), h.as_str()]).collect();
    let cut = names.len() > NODES_MAX;
    let names: Vec<&str> = names.into_iter().take(NODES_MAX).collect();
    let (w, h) = (640.0f64, 400.0f64);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"waitfor\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"8\" markerHeight=\"8\" \
         orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"#b33\"/></marker></defs>"
    );
    if names.is_empty() {
        let _ = write!(svg, "<text x=\"20\" y=\"40\" class=\"empty\">nobody waits: no wait-for edges</text></svg>");
        return svg;
    }
    let n = names.len() as f64;
    let at = |i: usize| {
        let angle = std::f64::consts::TAU * i as f64 / n - std::f64::consts::FRAC_PI_2;
        let r = if n == 1.0 { 0.0 } else { 150.0 };
        (w / 2.0 + r * angle.cos(), h / 2.0 + r * angle.sin())
    };
    let index = |name: &str| names.iter().position(|x| *x == name);
    for (waiter, holder) in edges {
        let (Some(a), Some(b)) = (index(waiter), index(holder)) else { continue };
        let ((x1, y1), (x2, y2)) = (at(a), at(b));
        // Stop short of the holder's circle.
        let (dx, dy) = (x2 - x1, y2 - y1);
        let len = (dx * dx + dy * dy).sqrt().max(1.0);
        let (x2, y2) = (x2 - dx / len * 22.0, y2 - dy / len * 22.0);
        let _ = write!(
            svg,
            "<line class=\"edge\" data-waiter=\"{}\" data-holder=\"{}\" x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" \
             y2=\"{y2:.1}\" stroke=\"#b33\" stroke-width=\"2\" marker-end=\"url(#arrow)\"/>",
            escape(waiter),
            escape(holder)
        );
    }
    let waiters: BTreeSet<&str> = edges.iter().map(|(w, _)| w.as_str()).collect();
    for (i, name) in names.iter().enumerate() {
        let (x, y) = at(i);
        let fill = if waiters.contains(name) { "#fde2e2" } else { "#e2effd" };
        let _ = write!(
            svg,
            "<g class=\"node\"><circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"20\" fill=\"{fill}\" stroke=\"#333\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"12\">{}</text></g>",
            y + 36.0,
            escape(name)
        );
    }
    if cut {
        let _ = write!(svg, "<text x=\"10\" y=\"{}\">only {NODES_MAX} owners drawn</text>", h - 10.0);
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_edge_is_an_arrow_between_labelled_owners() {
        let edges = vec![("session 2".to_string(), "session 1".to_string()), ("session 3".into(), "session 1".into())];
        let svg = wait_for(&edges);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<line class=\"edge\"").count(), 2);
        assert_eq!(svg.matches("<g class=\"node\">").count(), 3);
        assert!(svg.contains("data-waiter=\"session 2\" data-holder=\"session 1\""));
        assert!(wait_for(&[]).contains("nobody waits"));
        let odd = wait_for(&[("<a&b>".into(), "c".into())]);
        assert!(odd.contains("&lt;a&amp;b&gt;") && !odd.contains("<a&b>"));
    }

    #[test]
    fn a_huge_graph_is_cut_and_says_so() {
        let edges: Vec<_> = (0..200).map(|i| (format!("session {i}"), "session 999".to_string())).collect();
        let svg = wait_for(&edges);
        assert_eq!(svg.matches("<g class=\"node\">").count(), NODES_MAX);
        assert!(svg.contains("only 64 owners drawn"));
    }
}
