mod bind;
mod skb;
mod sock;
mod tcp;
